// The chat page: plain JavaScript over the protocol in docs/protocol.md.
//
// Elements a browser test can rely on:
//   #signin-name, #signin-token, #signin-submit      sign-in (dev name / jwt token)
//   #conn-state[data-state]                           connecting | online | reconnecting | offline | refused | disconnected
//   #room-name, #room-join, li[data-room]             join or create a room; the room list
//   #online li[data-user] .unread                     online users, unread private messages
//   #inbox li[data-with] .unread                      private conversations
//   #members li[data-user]                            the current room's members
//   #view-title, #messages .message[data-id][data-from] .body, #composer, #send
//   #typing, .seen                                    typing indicator, read receipts
//
// Text from the network only ever goes through textContent, never innerHTML.
'use strict';

const NAME = /^[A-Za-z0-9._-]{1,64}$/;
const ROOM = /^[A-Za-z0-9._-]{1,100}$/;
const $ = (id) => document.getElementById(id);

const state = {
  auth: 'dev',
  me: null,
  credential: null,
  socket: null,
  opened: false,
  status: 'offline',
  backoff: 500,
  retryTimer: null,
  rooms: new Map(), // room -> conversation
  dms: new Map(), // partner -> conversation
  online: new Set(),
  onlineCount: 0, // all online users; `online` lists at most a page of them
  view: null, // { kind: 'room' | 'dm', name }
  pending: new Map(), // ref -> { kind, name, body, id, failed }
  lastTyping: 0,
};

function conversation() {
  return {
    messages: new Map(), // id -> message frame
    more: true, // older history exists
    lastId: 0,
    unread: 0,
    members: new Set(), // the pages of members loaded so far (protocol 1.1 pages them)
    memberCount: 0, // all members, from `joined`, `member` and `member_count`
    membersMore: false, // further members follow the loaded pages
    reads: new Map(), // user -> read id (rooms); partner's position (dms) under the partner's name
    typing: new Map(), // user -> timer
    sentRead: 0,
    historyQueue: [], // 'before' | 'after', in request order
  };
}

function convOf(kind, name, create = true) {
  const map = kind === 'room' ? state.rooms : state.dms;
  if (!map.has(name) && create) map.set(name, conversation());
  return map.get(name);
}

// ---------- connection ----------

function setStatus(status, text) {
  state.status = status;
  const el = $('conn-state');
  el.dataset.state = status;
  el.textContent = text || status;
}

function wsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const param = state.auth === 'jwt' ? 'token' : 'user';
  return `${scheme}//${location.host}/ws?${param}=${encodeURIComponent(state.credential)}`;
}

function connect() {
  clearTimeout(state.retryTimer);
  setStatus(state.opened ? 'reconnecting' : 'connecting');
  const socket = new WebSocket(wsUrl());
  state.socket = socket;
  let opened = false;
  socket.onopen = () => { opened = true; };
  socket.onmessage = (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    handleFrame(frame);
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    if (event.code === 4001) {
      setStatus('disconnected', 'disconnected by the server');
      return;
    }
    if (!opened && !state.opened) {
      // Never got in: a refused sign-in (HTTP 401) looks like this from the browser.
      return checkRefusal();
    }
    scheduleReconnect();
  };
}

async function checkRefusal() {
  // A reachable server that dropped us before the upgrade refused the credentials.
  try {
    const response = await fetch('/config.json', { cache: 'no-store' });
    if (response.ok) {
      setStatus('refused', 'sign-in refused');
      signOut('Sign-in refused: check your name or token.');
      return;
    }
  } catch { /* server down: keep trying */ }
  scheduleReconnect();
}

function scheduleReconnect() {
  const delay = Math.min(state.backoff, 10_000) * (0.75 + Math.random() * 0.5);
  state.backoff = Math.min(state.backoff * 2, 10_000);
  let left = Math.ceil(delay / 1000);
  setStatus('reconnecting', `reconnecting in ${left}s`);
  state.retryTimer = setTimeout(connect, delay);
}

function send(frame) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify(frame));
    return true;
  }
  return false;
}

function newRef() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

// ---------- frames from the server ----------

function handleFrame(frame) {
  switch (frame.type) {
    case 'welcome': return onWelcome(frame);
    case 'joined': return onJoined(frame);
    case 'left': return;
    case 'member': return onMember(frame);
    case 'member_count': return onMemberCount(frame);
    case 'members': return onMembers(frame);
    case 'message': return onMessage('room', frame.room, frame);
    case 'direct': return onMessage('dm', frame.from === state.me ? frame.to : frame.from, frame);
    case 'ack': return onAck(frame);
    case 'history': return onHistory(frame);
    case 'inbox': return onInbox(frame);
    case 'online':
      state.online = new Set(frame.users);
      state.onlineCount = frame.count ?? frame.users.length;
      return renderOnline();
    case 'presence':
      if (frame.status === 'online') {
        if (!state.online.has(frame.user)) state.onlineCount += 1;
        state.online.add(frame.user);
      } else if (state.online.delete(frame.user)) {
        state.onlineCount = Math.max(0, state.onlineCount - 1);
      }
      return renderOnline();
    case 'typing': return onTyping(frame);
    case 'read': return onRead(frame);
    case 'error': return onError(frame);
    default: return undefined;
  }
}

function onWelcome(frame) {
  state.me = frame.user;
  state.opened = true;
  state.backoff = 500;
  setStatus('online');
  $('whoami').textContent = `signed in as ${frame.user}`;
  $('whoami').hidden = false;
  send({ type: 'who', watch: true });
  send({ type: 'inbox' });
  // Rejoin every room, resuming after the last message seen so nothing is missed.
  for (const [room, conv] of state.rooms) {
    send(conv.lastId > 0 ? { type: 'join', room, since: conv.lastId } : { type: 'join', room });
  }
  // Fetch what a private conversation missed while we were away.
  for (const [partner, conv] of state.dms) {
    if (conv.lastId > 0) requestHistory('dm', partner, 'after', conv.lastId);
  }
  resendPending();
}

function addMessages(conv, messages) {
  for (const m of messages) {
    conv.messages.set(m.id, m);
    conv.lastId = Math.max(conv.lastId, m.id);
  }
}

function onJoined(frame) {
  const conv = convOf('room', frame.room);
  conv.members = new Set(frame.members);
  conv.memberCount = frame.member_count ?? frame.members.length;
  conv.membersMore = conv.memberCount > frame.members.length;
  // A first join returns the newest 50: anything older exists only if the page came back full.
  if (conv.messages.size === 0) conv.more = frame.history.length >= 50;
  addMessages(conv, frame.history);
  if (frame.more) requestHistory('room', frame.room, 'after', conv.lastId);
  if (!state.view) openView('room', frame.room);
  renderRooms();
  if (isViewing('room', frame.room)) renderView();
}

function onMember(frame) {
  const conv = convOf('room', frame.room);
  if (frame.event === 'join') {
    if (!conv.members.has(frame.user)) conv.memberCount += 1;
    conv.members.add(frame.user);
  } else if (conv.members.delete(frame.user) || conv.membersMore) {
    conv.memberCount = Math.max(0, conv.memberCount - 1);
  }
  if (isViewing('room', frame.room)) renderMembers();
}

// A large room (protocol 1.1) announces its size instead of every join and leave: the loaded
// pages may be stale, so the list offers to load them again.
function onMemberCount(frame) {
  const conv = convOf('room', frame.room);
  conv.memberCount = frame.count;
  conv.membersMore = conv.memberCount > conv.members.size || conv.membersMore;
  if (isViewing('room', frame.room)) renderMembers();
}

function onMembers(frame) {
  const conv = convOf('room', frame.room);
  for (const user of frame.users) conv.members.add(user);
  conv.memberCount = frame.count;
  conv.membersMore = frame.more;
  if (isViewing('room', frame.room)) renderMembers();
}

function loadMoreMembers(room) {
  const conv = convOf('room', room);
  const after = [...conv.members].sort().pop();
  send(after ? { type: 'members', room, after } : { type: 'members', room });
}

function onMessage(kind, name, frame) {
  const conv = convOf(kind, name);
  if (conv.messages.has(frame.id)) return;
  addMessages(conv, [frame]);
  if (frame.from === state.me) dropPendingEcho(kind, name, frame);
  else if (!isViewing(kind, name) || document.hidden) conv.unread += 1;
  stopTyping(conv, frame.from);
  if (isViewing(kind, name)) renderView();
  if (kind === 'room') renderRooms(); else { renderOnline(); renderInbox(); }
}

function dropPendingEcho(kind, name, frame) {
  for (const [ref, p] of state.pending) {
    if (p.kind === kind && p.name === name && (p.id === frame.id || (!p.id && p.body === frame.body))) {
      state.pending.delete(ref);
      return;
    }
  }
}

function onAck(frame) {
  const p = state.pending.get(frame.ref);
  if (!p) return;
  p.id = frame.id;
  const conv = convOf(p.kind, p.name);
  if (p.kind === 'dm' && !conv.messages.has(frame.id)) {
    // The sending tab gets no echo of its own direct message: the ack makes it real.
    addMessages(conv, [{ type: 'direct', id: frame.id, from: state.me, to: p.name, body: p.body, ts: Date.now() }]);
  }
  if (conv.messages.has(frame.id)) state.pending.delete(frame.ref);
  if (isViewing(p.kind, p.name)) renderView();
}

function onError(frame) {
  const p = frame.ref && state.pending.get(frame.ref);
  if (p) {
    p.failed = `${frame.code}: ${frame.message}`;
    if (isViewing(p.kind, p.name)) renderView();
    return;
  }
  showNotice(`${frame.code}: ${frame.message}`);
}

function requestHistory(kind, name, direction, id) {
  const conv = convOf(kind, name);
  conv.historyQueue.push(direction);
  const frame = { type: 'history', limit: 50 };
  frame[kind === 'room' ? 'room' : 'with'] = name;
  if (id !== undefined) frame[direction] = id;
  send(frame);
}

function onHistory(frame) {
  const kind = frame.room ? 'room' : 'dm';
  const name = frame.room || frame.with;
  const conv = convOf(kind, name);
  const direction = conv.historyQueue.shift() || 'before';
  addMessages(conv, frame.messages);
  if (direction === 'before') conv.more = frame.more;
  else if (frame.more) requestHistory(kind, name, 'after', conv.lastId);
  if (isViewing(kind, name)) renderView();
}

function onInbox(frame) {
  for (const c of frame.conversations) {
    const conv = convOf('dm', c.with);
    conv.unread = isViewing('dm', c.with) ? 0 : c.unread;
    conv.sentRead = Math.max(conv.sentRead, c.read_id);
  }
  renderInbox();
  renderOnline();
}

function onTyping(frame) {
  const kind = frame.room ? 'room' : 'dm';
  const name = frame.room || frame.from;
  const conv = convOf(kind, name);
  clearTimeout(conv.typing.get(frame.from));
  conv.typing.set(frame.from, setTimeout(() => stopTyping(conv, frame.from), 4000));
  if (isViewing(kind, name)) renderTyping();
}

function stopTyping(conv, user) {
  if (!conv.typing.has(user)) return;
  clearTimeout(conv.typing.get(user));
  conv.typing.delete(user);
  renderTyping();
}

function onRead(frame) {
  const kind = frame.room ? 'room' : 'dm';
  const name = frame.room || frame.with;
  const conv = convOf(kind, name);
  conv.reads.set(frame.user, Math.max(conv.reads.get(frame.user) || 0, frame.id));
  if (isViewing(kind, name)) renderView();
}

// ---------- actions ----------

function isViewing(kind, name) {
  return state.view !== null && state.view.kind === kind && state.view.name === name;
}

function joinRoom(room) {
  if (!ROOM.test(room)) return showNotice('Room names are 1-100 letters, digits, dots, dashes or underscores.');
  if (!state.rooms.has(room)) convOf('room', room);
  saveRooms();
  send({ type: 'join', room });
  openView('room', room);
}

function leaveRoom(room) {
  send({ type: 'leave', room });
  state.rooms.delete(room);
  saveRooms();
  state.view = null;
  const next = state.rooms.keys().next();
  if (!next.done) openView('room', next.value); else renderAll();
}

function openView(kind, name) {
  state.view = { kind, name };
  const conv = convOf(kind, name);
  conv.unread = 0;
  if (kind === 'dm' && conv.messages.size === 0) requestHistory('dm', name, 'before');
  renderAll();
  $('composer').focus();
}

function submitComposer() {
  const input = $('composer');
  const body = input.value;
  if (!body.trim() || !state.view) return;
  const { kind, name } = state.view;
  const ref = newRef();
  state.pending.set(ref, { kind, name, body, id: 0, failed: null });
  sendPending(ref);
  input.value = '';
  renderView();
}

function sendPending(ref) {
  const p = state.pending.get(ref);
  const frame = p.kind === 'room'
    ? { type: 'send', room: p.name, body: p.body, ref }
    : { type: 'direct', to: p.name, body: p.body, ref };
  p.failed = null;
  if (!send(frame)) p.failed = 'not connected: will retry';
}

function resendPending() {
  // Same ref: the server delivers a message at most once however often it is retried.
  for (const [ref, p] of state.pending) if (!p.id) sendPending(ref);
}

function onComposerInput() {
  if (!state.view || Date.now() - state.lastTyping < 3000) return;
  state.lastTyping = Date.now();
  const { kind, name } = state.view;
  send(kind === 'room' ? { type: 'typing', room: name } : { type: 'typing', to: name });
}

function markRead() {
  if (!state.view || document.hidden) return;
  const { kind, name } = state.view;
  const conv = convOf(kind, name);
  if (conv.lastId > conv.sentRead && send(kind === 'room'
    ? { type: 'read', room: name, id: conv.lastId }
    : { type: 'read', with: name, id: conv.lastId })) {
    conv.sentRead = conv.lastId;
  }
}

// ---------- rendering ----------

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('data-')) node.setAttribute(k, v);
    else node[k] = v;
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

function badge(count) {
  const b = el('span', { class: 'unread' }, String(count));
  b.hidden = count === 0;
  return b;
}

function clickable(li, action) {
  li.tabIndex = 0;
  li.addEventListener('click', action);
  li.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); action(); } });
  return li;
}

function renderAll() {
  renderRooms();
  renderOnline();
  renderInbox();
  renderView();
}

function renderRooms() {
  const list = $('rooms');
  list.replaceChildren(...[...state.rooms.keys()].sort().map((room) => {
    const li = clickable(el('li', { 'data-room': room }), () => openView('room', room));
    li.append(el('span', {}, `# ${room}`), badge(state.rooms.get(room).unread));
    if (isViewing('room', room)) li.setAttribute('aria-current', 'true');
    return li;
  }));
}

function renderOnline() {
  const list = $('online');
  const hidden = Math.max(0, state.onlineCount - state.online.size);
  const rest = hidden > 0 ? [el('li', { class: 'more-users' }, `and ${hidden} more`)] : [];
  list.replaceChildren(...[...state.online].sort().map((user) => {
    if (user === state.me) return el('li', { 'data-user': user, class: 'me' }, `${user} (you)`);
    const li = clickable(el('li', { 'data-user': user }), () => openView('dm', user));
    const conv = state.dms.get(user);
    li.append(el('span', {}, user), badge(conv ? conv.unread : 0));
    if (isViewing('dm', user)) li.setAttribute('aria-current', 'true');
    return li;
  }), ...rest);
}

function renderInbox() {
  const list = $('inbox');
  const partners = [...state.dms.keys()].filter((p) => state.dms.get(p).lastId > 0 || isViewing('dm', p)).sort((a, b) => state.dms.get(b).lastId - state.dms.get(a).lastId || a.localeCompare(b));
  list.replaceChildren(...partners.map((partner) => {
    const li = clickable(el('li', { 'data-with': partner }), () => openView('dm', partner));
    li.append(el('span', {}, partner), badge(state.dms.get(partner).unread));
    if (isViewing('dm', partner)) li.setAttribute('aria-current', 'true');
    return li;
  }));
}

function renderMembers() {
  const room = state.view && state.view.kind === 'room' ? state.view.name : null;
  const conv = room ? convOf('room', room) : null;
  $('members-title').textContent = conv ? `In this room (${conv.memberCount})` : 'In this room';
  const items = (conv ? [...conv.members].sort() : []).map((user) => el('li', { 'data-user': user }, user));
  if (conv && conv.membersMore) {
    const more = el('button', { type: 'button', class: 'link', id: 'more-members' }, 'Show more');
    more.addEventListener('click', () => loadMoreMembers(room));
    items.push(el('li', {}, ''));
    items[items.length - 1].append(more);
  }
  $('members').replaceChildren(...items);
}

function renderTyping() {
  const line = $('typing');
  if (!state.view) { line.textContent = ''; return; }
  const conv = convOf(state.view.kind, state.view.name);
  const who = [...conv.typing.keys()];
  line.textContent = who.length === 0 ? '' : `${who.join(', ')} ${who.length === 1 ? 'is' : 'are'} typing…`;
}

function messageItem(m, extra = {}) {
  const mine = m.from === state.me;
  const li = el('li', { class: `message${mine ? ' mine' : ''}`, 'data-from': m.from, ...extra });
  const meta = el('div', { class: 'meta' });
  meta.append(el('span', { class: 'author' }, m.from));
  if (m.ts) meta.append(el('time', { dateTime: new Date(m.ts).toISOString() }, new Date(m.ts).toLocaleTimeString()));
  li.append(meta, el('div', { class: 'body' }, m.body));
  return li;
}

function renderView() {
  const title = $('view-title');
  const items = [];
  if (!state.view) {
    title.textContent = 'Pick a room or a person';
    $('composer-form').hidden = true;
    $('leave').hidden = true;
    $('load-older').hidden = true;
    $('messages').replaceChildren();
    renderMembers();
    renderTyping();
    return;
  }
  const { kind, name } = state.view;
  const conv = convOf(kind, name);
  title.textContent = kind === 'room' ? name : `${name} (private)`;
  $('composer-form').hidden = false;
  $('leave').hidden = kind !== 'room';
  $('load-older').hidden = !conv.more || conv.messages.size === 0;
  const sorted = [...conv.messages.values()].sort((a, b) => a.id - b.id);
  for (const m of sorted) items.push(messageItem(m, { 'data-id': String(m.id) }));
  for (const [ref, p] of state.pending) {
    if (p.kind !== kind || p.name !== name || conv.messages.has(p.id)) continue;
    const li = messageItem({ from: state.me, body: p.body }, { 'data-pending': 'true' });
    if (p.failed) {
      li.dataset.failed = 'true';
      const retry = el('button', { type: 'button', class: 'link' }, 'retry');
      retry.addEventListener('click', () => { sendPending(ref); renderView(); });
      li.append(el('div', { class: 'meta' }, `not sent (${p.failed}) `), retry);
    }
    items.push(li);
  }
  const last = sorted[sorted.length - 1];
  if (last) {
    const readers = [...conv.reads].filter(([user, id]) => user !== state.me && id >= last.id).map(([user]) => user);
    if (readers.length > 0) items.push(el('li', { class: 'seen' }, kind === 'room' ? `seen by ${readers.sort().join(', ')}` : 'seen'));
  }
  const list = $('messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren(...items);
  if (atBottom) list.scrollTop = list.scrollHeight;
  renderMembers();
  renderTyping();
  markRead();
}

let noticeTimer = null;
function showNotice(text) {
  const line = $('typing');
  line.textContent = text;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(renderTyping, 4000);
}

// ---------- sign-in and start-up ----------

function saveRooms() {
  sessionStorage.setItem('chat.rooms', JSON.stringify([...state.rooms.keys()]));
}

function signIn(credential) {
  state.credential = credential;
  sessionStorage.setItem('chat.credential', credential);
  for (const room of JSON.parse(sessionStorage.getItem('chat.rooms') || '[]')) {
    if (ROOM.test(room)) convOf('room', room);
  }
  $('signin').hidden = true;
  $('app').hidden = false;
  $('signout').hidden = false;
  renderAll();
  connect();
}

function signOut(message = '') {
  sessionStorage.removeItem('chat.credential');
  const socket = state.socket;
  state.socket = null;
  if (socket) socket.close(1000);
  clearTimeout(state.retryTimer);
  state.opened = false;
  state.rooms.clear();
  state.dms.clear();
  state.pending.clear();
  state.online.clear();
  state.view = null;
  $('app').hidden = true;
  $('signout').hidden = true;
  $('whoami').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message;
  if (state.status !== 'refused') setStatus('offline');
}

async function start() {
  try {
    const config = await (await fetch('/config.json', { cache: 'no-store' })).json();
    if (config.auth === 'jwt') state.auth = 'jwt';
  } catch { /* assume dev */ }
  $('signin-dev').hidden = state.auth !== 'dev';
  $('signin-jwt').hidden = state.auth !== 'jwt';
  $('signin-name').required = state.auth === 'dev';

  $('signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    if (state.auth === 'dev') {
      const name = $('signin-name').value.trim();
      if (!NAME.test(name)) {
        $('signin-error').textContent = 'Names are 1-64 letters, digits, dots, dashes or underscores.';
        return;
      }
      signIn(name);
    } else {
      const token = $('signin-token').value.trim();
      if (!token) { $('signin-error').textContent = 'Paste a token.'; return; }
      signIn(token);
    }
  });
  $('signout').addEventListener('click', () => signOut());
  $('room-form').addEventListener('submit', (e) => {
    e.preventDefault();
    joinRoom($('room-name').value.trim());
    $('room-name').value = '';
  });
  $('leave').addEventListener('click', () => state.view && leaveRoom(state.view.name));
  $('load-older').addEventListener('click', () => {
    if (!state.view) return;
    const conv = convOf(state.view.kind, state.view.name);
    const oldest = Math.min(...conv.messages.keys());
    requestHistory(state.view.kind, state.view.name, 'before', oldest);
  });
  $('composer-form').addEventListener('submit', (e) => { e.preventDefault(); submitComposer(); });
  $('composer').addEventListener('input', onComposerInput);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) renderView(); });
  // The browser knows before the socket does: reconnect as soon as the network is back.
  window.addEventListener('online', () => { if (!state.socket && state.credential) connect(); });

  const saved = sessionStorage.getItem('chat.credential');
  if (saved) signIn(saved);
}

start();
