// Workers (admin keys only): each live worker's last heartbeat — load, queue, tokens/s, resident adapters
// (device or host), fusion and Medusa acceptance — polled every second while the view is open.

import { getJson } from './api.js';
import { byId, el, fmtNum, replaceRows } from './dom.js';

const REFRESH_MS = 1000;
let timer = null;
let onError = () => {};

export function init(ctx) {
  onError = ctx.onError;
}

export async function show() {
  hide();
  await refresh();
  timer = setInterval(() => refresh().catch(onError), REFRESH_MS);
}

export function hide() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

async function refresh() {
  const workers = (await getJson('/v1/workers')).data;
  replaceRows(byId('workers-table').querySelector('tbody'), workers.map(row), 'no live worker', 8);
  byId('workers-updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function row(w) {
  const s = w.stats || {};
  const device = new Set(s.device_adapters || []);
  const age = Math.max(0, Date.now() / 1000 - w.heartbeat_at);
  const fused = s.fusion && s.fusion.fused_adapter;
  return el('tr', { dataset: { worker: w.worker_id } },
    el('td', {}, el('div', { text: w.worker_id }), el('div', { class: 'muted', text: `${w.url} · ${w.model_id}` })),
    el('td', { text: `yes (${age.toFixed(1)} s ago)` }),
    el('td', { text: `${w.in_flight}/${w.capacity} (gateway ${w.gateway_in_flight})` }),
    el('td', { class: 'queue', text: s.queue ?? '' }),
    el('td', { class: 'tps', text: fmtNum(s.tokens_per_s, 1) }),
    el('td', {}, w.resident_adapters.length ? w.resident_adapters.map((n) => el('span', {
      class: `tag${device.has(n) ? ' device' : ''}`, text: `${n} (${device.has(n) ? 'device' : 'host'})`,
    })) : el('span', { class: 'muted', text: `none (of ${w.max_adapters})` })),
    el('td', { text: fused ? `fused: ${fused}` : `off (${(s.fusion && s.fusion.fusions) || 0} fusions)` }),
    el('td', { class: 'medusa' }, medusa(s.medusa || {})));
}

function medusa(byOwner) {
  const owners = Object.entries(byOwner);
  if (!owners.length) return el('span', { class: 'muted', text: 'no heads' });
  return owners.map(([owner, m]) => el('div', {
    text: `${owner}: ${fmtNum(m.mean_tokens_per_step, 2)} tok/step, heads ${m.acceptance_by_head.map((a) => `${Math.round(a * 100)}%`).join(' / ')}`,
  }));
}
