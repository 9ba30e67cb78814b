// The API as this console calls it: the key from sessionStorage as a Bearer header (never in a URL),
// JSON errors as ApiError, uploads through XMLHttpRequest (upload progress), SSE read from fetch().

const KEY = 'adapterd.apiKey';

export const auth = {
  get key() { return sessionStorage.getItem(KEY) || ''; },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (auth.key) h.authorization = `Bearer ${auth.key}`;
  return h;
}

function errorMessage(status, text) {
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return body.error.message;
  } catch { /* not JSON */ }
  return text || `HTTP ${status}`;
}

export async function request(path, { method = 'GET', json, signal } = {}) {
  const init = { method, signal, headers: headers(), credentials: 'omit', cache: 'no-store' };
  if (json !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(json);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw new ApiError(response.status, errorMessage(response.status, await response.text()));
  return response;
}

export async function getJson(path, opts) {
  return (await request(path, opts)).json();
}

// POST a multipart form with upload progress (fetch has none): onProgress(fraction in [0, 1]).
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', path);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.addEventListener('progress', (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); });
    xhr.addEventListener('load', () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(new ApiError(xhr.status, errorMessage(xhr.status, xhr.responseText)));
    });
    xhr.addEventListener('error', () => reject(new ApiError(0, 'network error')));
    xhr.send(form);
  });
}

// Each SSE event's `data` (joined lines) from a streamed response; ends at the end of the body.
export async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, '\n');
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

export function baseModel(models) {
  const base = models.data.find((m) => !m.parent);
  return base ? base.id : '';
}
