// The console's shell: the API key (sessionStorage only), which views this key may see, tab switching.

import * as adapters from './adapters.js';
import { ApiError, auth, request } from './api.js';
import { byId } from './dom.js';
import * as finetune from './finetune.js';
import * as playground from './playground.js';
import * as workers from './workers.js';

const VIEWS = { adapters, workers, finetune, playground };
const session = { admin: false, onError: showError };
let current = null;

function showError(err) {
  const notice = byId('notice');
  notice.textContent = err instanceof ApiError && err.status === 401
    ? 'This page needs an API key: enter it above.' : `Error: ${err.message}`;
  notice.hidden = false;
}

function clearError() {
  byId('notice').hidden = true;
}

// Who the key is: admin (workers and placement visible), a tenant, or none accepted.
async function whoami() {
  try {
    await request('/v1/workers');
    session.admin = true;
  } catch (err) {
    if (!(err instanceof ApiError) || (err.status !== 403 && err.status !== 401)) throw err;
    session.admin = false;
    if (err.status === 401) {
      byId('whoami').textContent = auth.key ? 'key refused' : 'no key';
      return false;
    }
  }
  byId('whoami').textContent = session.admin ? (auth.key ? 'admin key' : 'admin (auth off)') : 'tenant key';
  return true;
}

async function open(name) {
  if (!VIEWS[name] || (name === 'workers' && !session.admin)) name = 'adapters';
  if (current) VIEWS[current].hide();
  current = name;
  for (const [view] of Object.entries(VIEWS)) byId(`view-${view}`).hidden = view !== name;
  for (const b of document.querySelectorAll('#tabs button')) b.classList.toggle('active', b.dataset.view === name);
  if (window.location.hash !== `#${name}`) window.history.replaceState(null, '', `#${name}`);
  clearError();
  try {
    await VIEWS[name].show();
  } catch (err) {
    showError(err);
  }
}

async function start() {
  byId('key-clear').hidden = !auth.key;
  let ok = false;
  try {
    ok = await whoami();
  } catch (err) {
    showError(err);
  }
  document.querySelector('#tabs [data-view="workers"]').hidden = !session.admin;
  if (!ok) {
    showError(new ApiError(401, 'needs a key'));
    return;
  }
  await open(window.location.hash.slice(1) || 'adapters');
}

byId('key-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = byId('key-input');
  if (input.value.trim()) auth.set(input.value.trim());
  input.value = '';
  window.location.reload();  // a clean page for the new key: nothing of the previous one's data stays
});
byId('key-clear').addEventListener('click', () => { auth.clear(); window.location.reload(); });
for (const b of document.querySelectorAll('#tabs button')) b.addEventListener('click', () => open(b.dataset.view));
window.addEventListener('hashchange', () => open(window.location.hash.slice(1)));
for (const view of Object.values(VIEWS)) view.init(session);
start();
