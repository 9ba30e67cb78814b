// Adapters: every version the key may see, its size and compression, which workers hold it (admin keys),
// upload by drag and drop (a PEFT folder, an archive, or loose files) with progress, download, delete.

import { getJson, request, upload } from './api.js';
import { byId, el, fmtBytes, fmtNum, replaceRows } from './dom.js';

let picked = [];  // [{file, path}] staged for the next upload
let session = null;

export function init(ctx) {
  session = ctx;
  const zone = byId('dropzone');
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', async (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    stage(await droppedFiles(e.dataTransfer));
  });
  byId('adapter-files').addEventListener('change', (e) => stage([...e.target.files].map((f) => ({ file: f, path: f.name }))));
  byId('adapter-folder').addEventListener('change', (e) => stage([...e.target.files].map((f) => ({
    file: f, path: f.webkitRelativePath || f.name,
  }))));
  byId('upload-form').addEventListener('submit', (e) => { e.preventDefault(); send(); });
}

export async function show() {
  await refresh();
}

export function hide() {}

function stage(files) {
  picked = files.filter((f) => !f.path.split('/').some((part) => part.startsWith('.')));
  byId('upload-picked').textContent = picked.length ? picked.map((f) => f.path).join(', ') : 'nothing picked';
  const name = byId('upload-name');
  if (!name.value && picked.length) {
    const first = picked[0].path;
    name.value = (first.includes('/') ? first.split('/')[0] : first.replace(/\.(zip|tar\.gz|tgz)$/, ''))
      .replace(/[^A-Za-z0-9._:-]/g, '-');
  }
}

// A drop's files, walking dropped folders (webkitGetAsEntry); plain files when entries are unavailable.
async function droppedFiles(dt) {
  const entries = [...(dt.items || [])].map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
  if (entries.length && entries.every(Boolean)) {
    const out = [];
    for (const entry of entries) await walk(entry, '', out);
    return out;
  }
  return [...dt.files].map((f) => ({ file: f, path: f.name }));
}

async function walk(entry, prefix, out) {
  if (out.length > 100) return;  // a PEFT folder has a handful of files
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push({ file, path: prefix + entry.name });
    return;
  }
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) return;
    for (const child of batch) await walk(child, `${prefix}${entry.name}/`, out);
  }
}

async function send() {
  const status = byId('upload-status');
  const bar = byId('upload-progress');
  if (!picked.length) { status.textContent = 'drop or pick the adapter first'; return; }
  const form = new FormData();
  form.append('name', byId('upload-name').value.trim());
  form.append('public', byId('upload-public').checked ? 'true' : 'false');
  const density = byId('upload-density').value;
  if (density) form.append('compression', JSON.stringify({ method: 'compeft', density: Number(density), alpha: 4.0 }));
  // the folder's own name is not part of a file's name in the store: send base names
  for (const { file, path } of picked) form.append('files', file, path.split('/').pop());
  status.textContent = 'uploading…';
  bar.value = 0;
  try {
    const info = await upload('/v1/adapters', form, (f) => { bar.value = f; });
    bar.value = 1;
    status.textContent = `stored ${info.name}@${info.latest}`;
    picked = [];
    byId('upload-picked').textContent = 'nothing picked';
    byId('adapter-files').value = '';
    byId('adapter-folder').value = '';
    await refresh();
  } catch (err) {
    status.textContent = `upload failed: ${err.message}`;
  }
}

// A model id in a path: each segment encoded, a namespace's '/' kept (TENANT/NAME@VERSION).
function refPath(id) {
  return id.split('/').map(encodeURIComponent).join('/');
}

async function placements() {
  if (!session.admin) return null;
  const held = new Map();  // model id → [{worker, device}]
  for (const w of (await getJson('/v1/workers')).data) {
    const device = new Set((w.stats && w.stats.device_adapters) || []);
    for (const name of w.resident_adapters) {
      const ref = name.includes('/') ? name.slice(name.indexOf('/') + 1) : name;
      for (const key of new Set([name, ref])) {
        if (!held.has(key)) held.set(key, []);
        held.get(key).push({ worker: w.worker_id, device: device.has(name) });
      }
    }
  }
  return held;
}

export async function refresh() {
  const tbody = byId('adapters-table').querySelector('tbody');
  const [list, held] = await Promise.all([getJson('/v1/adapters'), placements().catch(() => null)]);
  const rows = [];
  for (const adapter of list.data) {
    for (const v of [...adapter.versions].reverse()) rows.push(row(v, held));
  }
  replaceRows(tbody, rows, 'no adapters yet', 9);
}

function row(v, held) {
  const where = held === null ? el('span', { class: 'muted', text: 'admin key only' })
    : (held.get(v.id) || []).map((h) => el('span', {
      class: `tag${h.device ? ' device' : ''}`, text: `${h.worker} (${h.device ? 'device' : 'host'})`,
    }));
  const del = el('button', { type: 'button', class: 'danger', text: 'Delete' });
  del.addEventListener('click', async () => {
    if (del.dataset.armed !== '1') { del.dataset.armed = '1'; del.textContent = 'Really delete?'; return; }
    await request(`/v1/adapters/${refPath(v.id)}`, { method: 'DELETE' });
    await refresh();
  });
  return el('tr', { dataset: { model: v.id } },
    el('td', { text: v.id }),
    el('td', { text: v.compression ? `${v.kind} (${v.compression.method || 'compressed'})` : v.kind }),
    el('td', { text: v.rank }),
    el('td', { text: fmtBytes(v.stored_bytes) }),
    el('td', { text: `${fmtNum(v.compression_ratio, 2)}×` }),
    el('td', { text: v.owner }),
    el('td', { text: v.public ? 'yes' : 'no' }),
    el('td', { class: 'held' }, where),
    el('td', {}, el('button', { type: 'button', text: 'Download', onclick: () => download(v) }), ' ', del));
}

async function download(v) {
  const blob = await (await request(`/v1/adapters/${refPath(v.id)}/download`)).blob();
  const url = URL.createObjectURL(blob);
  const a = el('a', { href: url, download: `${v.name.replace(/\//g, '-')}-${v.version}.zip` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
