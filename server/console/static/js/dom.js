// Builds DOM nodes. Text always goes in as text nodes (never parsed as HTML), so user values are escaped.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') node.textContent = String(value);
    else if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else if (typeof value === 'boolean' || typeof value === 'number') node[key] = value;
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function replaceRows(tbody, rows, empty, columns) {
  clear(tbody);
  if (rows.length === 0) tbody.append(el('tr', {}, el('td', { colspan: String(columns), class: 'muted', text: empty })));
  else append(tbody, rows);
}

export function byId(id) {
  return document.getElementById(id);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '';
  const units = ['B', 'KB', 'MB', 'GB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function fmtNum(x, digits = 3) {
  return typeof x === 'number' && Number.isFinite(x) ? Number(x.toFixed(digits)).toString() : '';
}
