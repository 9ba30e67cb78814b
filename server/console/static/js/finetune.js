// Fine-tune: training files (upload; a bad line is named by the server with its number), a job form with
// the method's hyperparameters, the jobs list, and one job followed live over its SSE event stream
// (fetch + a stream reader, since EventSource cannot send the key): status, progress, loss curves,
// checkpoints, cancel.

import { baseModel, getJson, request, sseData, upload } from './api.js';
import { LossChart } from './chart.js';
import { byId, clear, el, fmtBytes, fmtNum, replaceRows } from './dom.js';

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const LIST_MS = 2000;
let methods = {};
let listTimer = null;
let followed = null;  // {id, abort: AbortController, chart, timer}
let onError = () => {};

export function init(ctx) {
  onError = ctx.onError;
  byId('file-form').addEventListener('submit', (e) => { e.preventDefault(); uploadFile().catch(onError); });
  byId('job-form').addEventListener('submit', (e) => { e.preventDefault(); createJob().catch(onError); });
  byId('job-method').addEventListener('change', renderParams);
  byId('job-cancel').addEventListener('click', () => cancel().catch(onError));
}

export async function show() {
  hide();
  if (!Object.keys(methods).length) {
    methods = await getJson('/ui/methods.json');
    const select = clear(byId('job-method'));
    for (const kind of Object.keys(methods)) select.append(el('option', { value: kind, text: kind }));
    renderParams();
  }
  await Promise.all([refreshFiles(), refreshJobs()]);
  listTimer = setInterval(() => refreshJobs().catch(onError), LIST_MS);
}

export function hide() {
  if (listTimer !== null) clearInterval(listTimer);
  listTimer = null;
}

function renderParams() {
  const box = clear(byId('job-params'));
  const spec = methods[byId('job-method').value] || {};
  for (const [name, value] of Object.entries(spec)) {
    if (name === 'type') continue;
    const shown = typeof value === 'string' ? value : JSON.stringify(value);
    box.append(el('label', {}, name, el('input', { name, value: shown, dataset: { default: shown } })));
  }
}

function paramValue(text) {
  try { return JSON.parse(text); } catch { return text; }
}

async function uploadFile() {
  const input = byId('train-file');
  const errorBox = byId('file-error');
  const status = byId('file-status');
  errorBox.hidden = true;
  if (!input.files.length) { status.textContent = 'pick a JSONL file first'; return; }
  const form = new FormData();
  form.append('purpose', 'fine-tune');
  form.append('file', input.files[0]);
  status.textContent = 'uploading…';
  try {
    const f = await upload('/v1/files', form, (x) => { byId('file-progress').value = x; });
    status.textContent = `uploaded ${f.id} (${f.records} records)`;
    await refreshFiles();
  } catch (err) {
    status.textContent = 'rejected';
    errorBox.textContent = err.message;
    errorBox.hidden = false;
  }
}

async function refreshFiles() {
  const files = (await getJson('/v1/files?purpose=fine-tune')).data;
  replaceRows(byId('files-table').querySelector('tbody'), files.map((f) => el('tr', { dataset: { file: f.id } },
    el('td', { text: f.id }), el('td', { class: 'filename', text: f.filename }), el('td', { text: f.records ?? '' }),
    el('td', { text: fmtBytes(f.bytes) }))), 'no training files yet', 4);
  for (const [id, optional] of [['job-train', false], ['job-valid', true]]) {
    const select = byId(id);
    const keep = select.value;
    clear(select);
    if (optional) select.append(el('option', { value: '', text: 'none' }));
    for (const f of files) select.append(el('option', { value: f.id, text: `${f.filename} (${f.id})` }));
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }
}

async function createJob() {
  const status = byId('job-create-status');
  const method = { type: byId('job-method').value };
  for (const input of byId('job-params').querySelectorAll('input')) {
    if (input.value !== input.dataset.default) method[input.name] = paramValue(input.value);
  }
  const body = {
    model: baseModel(await getJson('/v1/models')),
    training_file: byId('job-train').value,
    method,
  };
  if (byId('job-valid').value) body.validation_file = byId('job-valid').value;
  if (byId('job-suffix').value) body.suffix = byId('job-suffix').value;
  if (byId('job-seed').value) body.seed = Number(byId('job-seed').value);
  try {
    const job = await (await request('/v1/fine_tuning/jobs', { method: 'POST', json: body })).json();
    status.textContent = `created ${job.id}`;
    await refreshJobs();
    follow(job.id);
  } catch (err) {
    status.textContent = `refused: ${err.message}`;
  }
}

async function refreshJobs() {
  const jobs = (await getJson('/v1/fine_tuning/jobs?limit=50')).data;
  replaceRows(byId('jobs-table').querySelector('tbody'), jobs.map((j) => {
    const tr = el('tr', { dataset: { job: j.id }, class: followed && followed.id === j.id ? 'selected' : '' },
      el('td', {}, el('a', { href: '#finetune', text: j.id })),
      el('td', { text: j.method && j.method.type }),
      el('td', { class: 'status', text: j.status }),
      el('td', { text: j.total_steps ? `${j.step}/${j.total_steps}` : '' }),
      el('td', { text: fmtNum(j.train_loss, 4) }),
      el('td', { text: j.fine_tuned_model || '' }));
    tr.querySelector('a').addEventListener('click', (e) => { e.preventDefault(); follow(j.id); });
    return tr;
  }), 'no jobs yet', 6);
}

function unfollow() {
  if (!followed) return;
  followed.abort.abort();
  clearInterval(followed.timer);
  followed.chart.destroy();
  followed = null;
}

export function follow(id) {
  unfollow();
  byId('job-detail').hidden = false;
  byId('job-title').textContent = `Job ${id}`;
  clear(byId('job-events'));
  const chart = new LossChart(byId('loss-chart'));
  followed = { id, abort: new AbortController(), chart, timer: null };
  for (const tr of byId('jobs-table').querySelectorAll('tbody tr')) tr.classList.toggle('selected', tr.dataset.job === id);
  const current = followed;
  const poll = () => refreshJob(current).catch(onError);
  current.timer = setInterval(poll, LIST_MS);
  poll();
  stream(current).catch((err) => { if (err.name !== 'AbortError') onError(err); });
}

async function stream(current) {
  const response = await request(`/v1/fine_tuning/jobs/${encodeURIComponent(current.id)}/events?stream=true`,
    { signal: current.abort.signal });
  for await (const data of sseData(response)) {
    if (data === '[DONE]') break;
    const ev = JSON.parse(data);
    if (ev.error) throw new Error(ev.error.message);
    byId('job-events').append(el('li', { class: `level-${ev.level}`, text: ev.message }));
    const d = ev.data || {};
    if (ev.type === 'metrics' && typeof d.step === 'number') {
      current.chart.add(d.step, d.train_loss, d.validation_loss ?? d.valid_loss);
      if (d.total_steps) showProgress(d.step, d.total_steps);
    }
  }
  await refreshJob(current);
}

function showProgress(step, total) {
  byId('job-progress').value = total ? step / total : 0;
  byId('job-step').textContent = total ? `step ${step}/${total}` : '';
}

async function refreshJob(current) {
  const [job, checkpoints] = await Promise.all([
    getJson(`/v1/fine_tuning/jobs/${encodeURIComponent(current.id)}`),
    getJson(`/v1/fine_tuning/jobs/${encodeURIComponent(current.id)}/checkpoints?limit=50`),
  ]);
  if (followed !== current) return;
  const status = byId('job-status');
  status.textContent = job.status + (job.error ? `: ${job.error.message}` : '')
    + (job.fine_tuned_model ? ` → ${job.fine_tuned_model}` : '');
  status.dataset.status = job.status;
  if (job.total_steps) showProgress(job.step, job.total_steps);
  byId('job-cancel').disabled = TERMINAL.has(job.status);
  replaceRows(byId('checkpoints-table').querySelector('tbody'), checkpoints.data.map((c) => el('tr', {},
    el('td', { text: c.step_number }), el('td', { text: c.fine_tuned_model_checkpoint }),
    el('td', { text: Object.entries(c.metrics || {}).map(([k, v]) => `${k}=${fmtNum(v, 4)}`).join(', ') }))),
  'no checkpoints yet', 3);
  if (TERMINAL.has(job.status)) clearInterval(current.timer);
}

async function cancel() {
  if (!followed) return;
  await request(`/v1/fine_tuning/jobs/${encodeURIComponent(followed.id)}/cancel`, { method: 'POST' });
  await refreshJob(followed);
}
