// Playground: one chat, or two or three side by side on the same prompt (each pane its own base, adapter,
// version or `merged_adapters` merge), all streamed at once from /v1/chat/completions, with time to first
// token and tokens/s under each pane.

import { baseModel, getJson, request, sseData } from './api.js';
import { byId, clear, el, fmtNum } from './dom.js';

const MERGE = '__merge__';
let models = [];
let base = '';
let panes = [];
let onError = () => {};

export function init(ctx) {
  onError = ctx.onError;
  byId('play-form').addEventListener('submit', (e) => { e.preventDefault(); send(); });
  byId('play-count').addEventListener('change', layout);
  byId('play-clear').addEventListener('click', () => panes.forEach((p) => { p.history = []; clear(p.transcript); }));
}

export async function show() {
  const list = await getJson('/v1/models');
  base = baseModel(list);
  models = list.data.map((m) => m.id);
  if (!panes.length) layout();
  else panes.forEach(fillTargets);
}

export function hide() {}

function layout() {
  const want = Number(byId('play-count').value);
  while (panes.length > want) panes.pop().node.remove();
  while (panes.length < want) {
    const pane = makePane(panes.length);
    panes.push(pane);
    byId('panes').append(pane.node);
  }
}

function makePane(index) {
  const target = el('select', { class: 'target', 'aria-label': `model ${index + 1}` });
  const mergeIds = el('input', { class: 'merge-ids', placeholder: 'adapter:weight, adapter:weight' });
  const strategy = el('select', { class: 'merge-strategy' },
    el('option', { value: 'linear', text: 'linear' }), el('option', { value: 'ties', text: 'ties' }));
  const density = el('input', { class: 'merge-density', type: 'number', min: '0.01', max: '1', step: '0.05', value: '1' });
  const mergeBox = el('div', { class: 'row merge', hidden: true }, mergeIds, strategy,
    el('label', {}, 'density ', density));
  const transcript = el('div', { class: 'transcript' });
  const stats = el('div', { class: 'stats' });
  const node = el('div', { class: 'pane', dataset: { pane: String(index) } }, target, mergeBox, transcript, stats);
  const pane = { node, target, mergeIds, strategy, density, mergeBox, transcript, stats, history: [] };
  target.addEventListener('change', () => { mergeBox.hidden = target.value !== MERGE; });
  fillTargets(pane);
  return pane;
}

function fillTargets(pane) {
  const keep = pane.target.value;
  clear(pane.target);
  for (const id of models) pane.target.append(el('option', { value: id, text: id === base ? `${id} (base)` : id }));
  pane.target.append(el('option', { value: MERGE, text: 'merge of adapters…' }));
  if ([...pane.target.options].some((o) => o.value === keep)) pane.target.value = keep;
  pane.mergeBox.hidden = pane.target.value !== MERGE;
}

function mergeSpec(pane) {
  const ids = [];
  const weights = [];
  for (const part of pane.mergeIds.value.split(',').map((s) => s.trim()).filter(Boolean)) {
    const cut = part.lastIndexOf(':');
    const weight = cut > 0 ? Number(part.slice(cut + 1)) : NaN;
    ids.push(Number.isFinite(weight) ? part.slice(0, cut) : part);
    weights.push(Number.isFinite(weight) ? weight : 1);
  }
  return { ids, weights, strategy: pane.strategy.value, density: Number(pane.density.value) || 1 };
}

function send() {
  const prompt = byId('play-prompt').value;
  if (!prompt.trim()) return;
  byId('play-prompt').value = '';
  // every pane at once: the streams run concurrently
  Promise.all(panes.map((p) => chat(p, prompt))).catch(onError);
}

function bubble(pane, who, text) {
  const body = el('span', { class: 'text', text });
  const msg = el('div', { class: `msg ${who}` }, el('span', { class: 'who', text: `${who}:` }), body);
  pane.transcript.append(msg);
  return body;
}

async function chat(pane, prompt) {
  pane.history.push({ role: 'user', content: prompt });
  bubble(pane, 'user', prompt);
  const out = bubble(pane, 'assistant', '');
  const messages = [...pane.history];
  const system = byId('play-system').value.trim();
  if (system) messages.unshift({ role: 'system', content: system });
  const body = {
    messages,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number(byId('play-max').value) || 64,
    temperature: Number(byId('play-temp').value),
  };
  if (pane.target.value === MERGE) {
    body.model = base;
    body.merged_adapters = mergeSpec(pane);
  } else {
    body.model = pane.target.value;
  }
  pane.stats.textContent = 'waiting…';
  pane.node.dataset.state = 'streaming';
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let text = '';
  try {
    const response = await request('/v1/chat/completions', { method: 'POST', json: body });
    for await (const data of sseData(response)) {
      if (data === '[DONE]') break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        chunks += 1;
        text += delta.content;
        out.textContent = text;
        pane.node.dataset.chunks = String(chunks);
      }
    }
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const ttft = first === null ? null : first - started;
    const rate = first !== null && end > first && tokens > 1 ? (tokens - 1) / ((end - first) / 1000) : null;
    pane.stats.textContent = `TTFT ${ttft === null ? '–' : `${Math.round(ttft)} ms`} · ${rate === null ? '–' : fmtNum(rate, 1)} tokens/s · ${tokens} tokens`;
    pane.history.push({ role: 'assistant', content: text });
    pane.node.dataset.state = 'done';
  } catch (err) {
    pane.stats.textContent = `error: ${err.message}`;
    pane.node.dataset.state = 'error';
    pane.history.pop();
  }
}
