// The chat page: plain JavaScript over the protocol in docs/protocol.md (v1.1). How it behaves
// (connection, sending, receipts, layout) and why is written down in docs/page.md.
//
// Elements a browser test can rely on:
//   #signin-name, #signin-token, #signin-submit      sign-in (dev name / jwt token)
//   #conn-state[data-state]                           connecting | online | reconnecting | offline | refused | disconnected
//   #room-name, #room-join, li[data-room]             join or create a room; the room list
//   #dm-name, #dm-start                               write to anyone (online or not)
//   #online li[data-user] .unread                     online users, unread private messages
//   #inbox li[data-with] .unread                      private conversations (from `inbox`)
//   #members li[data-user], #members-panel            the current room's members (rooms only)
//   #view-title, #view-count                          the conversation, a room's member count
//   #messages .message[data-id][data-from] .body      messages; pending ones have data-pending,
//                                                     failed ones data-failed (and stay in place)
//   #messages li.empty, #load-older, #jump            empty conversation, older history, "new below"
//   #composer, #send, #composer-count[data-over]      the box, and how far over the limit it is
//   #typing, .seen, #notice                           typing indicator, read receipts, notices
//
// Text from the network only ever goes through textContent, never innerHTML. Credentials are
// never logged.
'use strict';

const NAME = /^[A-Za-z0-9._-]{1,64}$/;
const ROOM = /^[A-Za-z0-9._-]{1,100}$/;
const MAX_BODY = 4096; // the server's default --max-body-chars; a lower one answers too_large
const SHOW_COUNT_FROM = 3500; // the character count appears when the text nears the limit
const HISTORY_PAGE = 50;
const READ_EVERY = 1000; // read receipts: the highest id, at most once a second
const TYPING_EVERY = 3000; // "typing" is announced at most this often per conversation...
const TYPING_SHOWN = 4000; // ...and shown this long after the last announcement
const ACK_TIMEOUT = 10_000; // a send with no answer this long is sent again (same ref)
const RATE_LIMITED_WAIT = 1000; // when a rate_limited error carries no retry_after_ms
const BUCKET_RATE = 5; // frames per second the page allows itself (the server default is 10)...
const BUCKET_BURST = 10; // ...and at once (server default 30); halved when the server says slow down
const SEEN_NAMES = 3; // "seen by a, b, c"; more are "seen by N" with the names on demand
const AT_BOTTOM = 40; // px: a reader this close to the end follows new messages
const $ = (id) => document.getElementById(id);

const state = {
  auth: 'dev',
  credential: null,
  me: null,
  admitted: false, // this credential got a `welcome` on this page
  refusals: 0, // handshakes refused in a row while the server answered HTTP
  epoch: null, // welcome.epoch: the store's lifetime the ids below belong to
  socket: null,
  online: false, // the socket is open and welcomed
  status: 'offline',
  backoff: 500,
  retryTimer: null,
  rooms: new Map(), // room -> conversation
  dms: new Map(), // partner -> conversation
  dmOrder: [], // partners, most recent first
  users: new Set(), // online users (a page of them)
  onlineCount: 0,
  view: null, // { kind: 'room' | 'dm', name }
  pending: new Map(), // ref -> pending message, in the order written
  seq: 0,
  historyWait: [], // history requests on the wire, in the order sent: the server answers in order
  control: new Map(), // ref -> { frame, at, prevRead? } frames sent that a rate_limited may refuse
  readTimer: null,
  lastReadSent: 0,
  typingKey: null,
  typingAt: 0,
  ackTimer: null,
  sendTimer: null,
  notice: null,
  noticeTimer: null,
};

function conversation(kind, name) {
  return {
    kind,
    name,
    messages: new Map(), // id -> message frame
    ids: [], // the ids of `messages`, ascending
    lastId: 0,
    loaded: false, // the newest page is here (a join's history, or a first `history`)
    more: false, // older history exists
    loadingOlder: false,
    joined: false, // rooms: `joined` came on this connection
    joinSince: 0,
    serverLast: 0, // dms: the newest id `inbox` reported
    unread: 0,
    members: new Set(),
    memberCount: 0,
    membersMore: false,
    reads: new Map(), // user -> read id
    typing: new Map(), // user -> timer
    sentRead: 0,
    wantRead: 0,
  };
}

function convOf(kind, name, create = true) {
  const map = kind === 'room' ? state.rooms : state.dms;
  if (!map.has(name) && create) map.set(name, conversation(kind, name));
  return map.get(name);
}

const keyOf = (kind, name) => `${kind}:${name}`;

// ---------- rendering is batched: state changes mark what to draw, one flush draws it ----------

const dirty = new Set();
let flushTimer = null;

function mark(...parts) {
  for (const p of parts) dirty.add(p);
  if (flushTimer === null) flushTimer = setTimeout(flush, 0);
}

// ---------- connection ----------

function setStatus(status, text) {
  state.status = status;
  const node = $('conn-state');
  node.dataset.state = status;
  node.textContent = text || status;
}

function wsUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  // A browser's WebSocket cannot send an Authorization header: the token travels in the URL
  // (see docs/page.md for what that means and how to keep it out of logs).
  const param = state.auth === 'jwt' ? 'token' : 'user';
  return `${scheme}//${location.host}/ws?${param}=${encodeURIComponent(state.credential)}`;
}

// The `exp` of a JWT, in ms, or null when it has none or is not a JWT.
function tokenExpiry(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

function tokenExpired() {
  if (state.auth !== 'jwt') return false;
  const exp = tokenExpiry(state.credential);
  return exp !== null && exp <= Date.now();
}

function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (!state.credential || state.socket) return;
  if (tokenExpired()) {
    signOut(state.admitted ? 'Your token expired: sign in again.' : 'This token has expired.', 'refused');
    return;
  }
  setStatus(state.admitted ? 'reconnecting' : 'connecting', state.admitted ? 'reconnecting…' : 'connecting…');
  const socket = new WebSocket(wsUrl());
  state.socket = socket;
  let opened = false;
  socket.onopen = () => { opened = true; };
  socket.onmessage = (event) => {
    if (state.socket !== socket) return;
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    handleFrame(frame);
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    connectionLost();
    if (event.code === 4001) {
      setStatus('disconnected', 'disconnected by the server');
      return;
    }
    if (!opened) {
      diagnose();
      return;
    }
    // 1012: this server node lost its lease and asks for a reconnect at once.
    if (event.code === 1012) state.backoff = 0;
    scheduleReconnect();
  };
}

// A socket that never opened. The browser does not say why: an HTTP refusal (401 bad
// credentials, 403 foreign origin, 429 too many connections, 503 server full) and a network
// failure look the same. The rule (docs/page.md):
//   * the server does not answer GET /healthz: a network failure (or the server is down):
//     retry with backoff, stay signed in;
//   * it answers: the handshake was refused. Only a 401 means "sign in again", and the page
//     takes a refusal for a 401 only when it cannot be anything else likely:
//       - a token past its `exp` (checked before every attempt): sign out at once;
//       - a token that never got in on this page, refused 3 times in a row: sign out;
//       - anything else (a development name, which the page checks against the same rules as
//         the server, or a token that got in before and has not expired) is a 429/503/403 or a
//         server restarting: retry, at least 5 s apart (what Retry-After says for 429/503).
async function diagnose() {
  const credential = state.credential;
  let reachable = false;
  try {
    const response = await fetch('/healthz', { cache: 'no-store' });
    reachable = response.ok;
  } catch { /* no answer: the network or the server is down */ }
  if (state.credential !== credential || state.socket) return;
  if (!reachable) {
    state.refusals = 0;
    scheduleReconnect();
    return;
  }
  state.refusals += 1;
  if (state.auth === 'jwt' && !state.admitted && state.refusals >= 3) {
    signOut('Sign-in refused: check your token.', 'refused');
    return;
  }
  const wait = state.refusals >= 3 ? 5000 : 1000 * state.refusals;
  scheduleReconnect(wait, 'the server refused the connection; retrying');
}

function scheduleReconnect(atLeast = 0, why = 'reconnecting') {
  clearTimeout(state.retryTimer);
  const delay = Math.max(atLeast, Math.min(state.backoff, 10_000) * (0.75 + Math.random() * 0.5));
  state.backoff = Math.min(Math.max(state.backoff * 2, 500), 10_000);
  setStatus(state.admitted ? 'reconnecting' : 'connecting', `${why} in ${Math.ceil(delay / 1000)}s`);
  state.retryTimer = setTimeout(connect, delay);
}

// Everything tied to one connection ends with it; what the page remembers (messages, ids,
// pending messages) stays, and `welcome` picks it up again.
function connectionLost() {
  state.online = false;
  outbox.queue = [];
  outbox.pausedUntil = 0; // the server's bucket is per connection: the next one starts full
  clearTimeout(outbox.timer);
  outbox.timer = null;
  state.historyWait = [];
  state.control.clear();
  clearTimeout(state.readTimer);
  state.readTimer = null;
  clearTimeout(state.ackTimer);
  state.ackTimer = null;
  for (const conv of [...state.rooms.values(), ...state.dms.values()]) {
    conv.joined = false;
    conv.loadingOlder = false;
  }
  for (const p of state.pending.values()) {
    if (p.status === 'inflight') setPending(p, 'queued');
  }
  mark('view');
}

// ---------- the outbox: every frame leaves through it, paced under the server's rate limit ----------
//
// The server allows a connection `rate` frames a second and bursts of `burst` (10 and 30 by
// default) and refuses more with `rate_limited`. The page keeps its own token bucket below that
// (5/s, 10 at once), slows down when it is refused anyway (a server configured lower: to just
// under the rate the server's hint implies, or to half without a hint) and grows back slowly.
// A refused frame is sent again after the server's `retry_after_ms` (or 1 s when the server
// gives no hint); a refused message keeps its place, and the messages of one conversation leave
// one at a time, so a refusal can never reorder them.

const outbox = {
  queue: [],
  tokens: BUCKET_BURST,
  rate: BUCKET_RATE,
  burst: BUCKET_BURST,
  last: 0,
  pausedUntil: 0,
  limitedAt: 0,
  grownAt: 0,
  timer: null,
};

function refill(now) {
  if (outbox.last === 0) outbox.last = now;
  outbox.tokens = Math.min(outbox.burst, outbox.tokens + ((now - outbox.last) / 1000) * outbox.rate);
  outbox.last = now;
  // Additive increase: every 10 s without a refusal, a little more.
  if (outbox.rate < BUCKET_RATE && now - Math.max(outbox.limitedAt, outbox.grownAt) > 10_000) {
    outbox.rate = Math.min(BUCKET_RATE, outbox.rate + 1);
    outbox.burst = Math.min(BUCKET_BURST, outbox.burst + 2);
    outbox.grownAt = now;
  }
}

function enqueue(frame, front = false) {
  if (!state.online) return false;
  if (front) outbox.queue.unshift(frame); else outbox.queue.push(frame);
  pump();
  return true;
}

function pump() {
  clearTimeout(outbox.timer);
  outbox.timer = null;
  if (!state.online) return;
  const now = performance.now();
  refill(now);
  while (outbox.queue.length > 0 && now >= outbox.pausedUntil && outbox.tokens >= 1) {
    outbox.tokens -= 1;
    transmit(outbox.queue.shift());
  }
  if (outbox.queue.length > 0) {
    const wait = Math.max(outbox.pausedUntil - now, ((1 - outbox.tokens) / outbox.rate) * 1000);
    outbox.timer = setTimeout(pump, Math.max(5, wait));
  }
}

// For frames worth nothing late (typing): sent now if a token is free, else not at all.
function sendNowOrDrop(frame) {
  if (!state.online || outbox.queue.length > 0) return false;
  const now = performance.now();
  refill(now);
  if (now < outbox.pausedUntil || outbox.tokens < 1) return false;
  outbox.tokens -= 1;
  transmit(frame);
  return true;
}

function transmit(frame) {
  const now = Date.now();
  if (frame.type === 'send' || frame.type === 'direct') {
    const p = state.pending.get(frame.ref);
    if (p) p.sentAt = now;
    armAckTimer();
  } else {
    // Kept a minute, for a rate_limited refusal to find it; older ones are forgotten.
    for (const [ref, entry] of state.control) {
      if (now - entry.at < 60_000) break;
      state.control.delete(ref);
    }
    state.control.set(frame.ref, { frame, at: now, prevRead: frame.prevRead });
    delete frame.prevRead;
    if (frame.type === 'history') {
      state.historyWait.push({ ref: frame.ref, kind: frame.room ? 'room' : 'dm', name: frame.room || frame.with, direction: frame.after !== undefined ? 'after' : 'before' });
    } else if (frame.type === 'join') {
      const conv = state.rooms.get(frame.room);
      if (conv) conv.joinSince = frame.since || 0;
    }
  }
  state.socket.send(JSON.stringify(frame));
}

function onRateLimited(frame) {
  const hinted = Number.isFinite(frame.retry_after_ms) && frame.retry_after_ms > 0;
  const wait = hinted ? frame.retry_after_ms : RATE_LIMITED_WAIT;
  const now = performance.now();
  // Slow down, once per refusal window. Right after a refusal the server's bucket holds less
  // than one token, so its hint (the time to the next token) is at most 1/rate: 1000/hint is at
  // least the server's rate, and a little under it is a fair pace. Without a hint: halve.
  if (now - outbox.limitedAt > wait) {
    const estimate = hinted ? 900 / wait : outbox.rate / 2;
    outbox.rate = Math.max(0.5, Math.min(outbox.rate, estimate));
    outbox.burst = Math.max(2, Math.floor(outbox.burst / 2));
  }
  outbox.limitedAt = now;
  outbox.tokens = 0;
  outbox.pausedUntil = Math.max(outbox.pausedUntil, now + wait);
  const p = frame.ref && state.pending.get(frame.ref);
  if (p) {
    if (p.status === 'inflight') setPending(p, 'queued', 'rate limited: resending');
    schedulePumpSends(wait);
  } else if (frame.ref && state.control.has(frame.ref)) {
    const entry = state.control.get(frame.ref);
    state.control.delete(frame.ref);
    const refused = entry.frame;
    if (refused.type === 'history') dropHistoryWait(frame.ref);
    if (refused.type === 'read') {
      // Send the receipt again with the next flush.
      const conv = convOf(refused.room ? 'room' : 'dm', refused.room || refused.with, false);
      if (conv && conv.sentRead === refused.id) conv.sentRead = entry.prevRead || 0;
      scheduleReads(wait);
    } else if (refused.type !== 'typing') {
      outbox.queue.unshift(refused);
    }
  }
  pump();
}

function newRef() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

// Every frame but `send`/`direct` (whose ref is the pending message's) gets a ref of its own, so
// that an error about it, rate_limited included, says which frame it was about.
function request(frame) {
  frame.ref = newRef();
  return enqueue(frame);
}

// ---------- frames from the server ----------

function handleFrame(frame) {
  switch (frame.type) {
    case 'welcome': return onWelcome(frame);
    case 'joined': return onJoined(frame);
    case 'left': return undefined;
    case 'member': return onMember(frame);
    case 'member_count': return onMemberCount(frame);
    case 'members': return onMembers(frame);
    case 'message': return onLive('room', frame.room, frame);
    case 'direct': return onLive('dm', frame.from === state.me ? frame.to : frame.from, frame);
    case 'ack': return onAck(frame);
    case 'history': return onHistory(frame);
    case 'inbox': return onInbox(frame);
    case 'online':
      state.users = new Set(frame.users);
      state.onlineCount = frame.count ?? frame.users.length;
      return mark('online');
    case 'presence':
      if (frame.status === 'online') {
        if (!state.users.has(frame.user)) state.onlineCount += 1;
        state.users.add(frame.user);
      } else if (state.users.delete(frame.user)) {
        state.onlineCount = Math.max(0, state.onlineCount - 1);
      }
      return mark('online');
    case 'typing': return onTyping(frame);
    case 'read': return onRead(frame);
    case 'error': return onError(frame);
    default: return undefined;
  }
}

function onWelcome(frame) {
  const first = !state.admitted;
  state.me = frame.user;
  state.admitted = true;
  state.refusals = 0;
  state.backoff = 500;
  if (first) restoreSaved();
  if (state.epoch !== null && frame.epoch !== state.epoch) newEpoch();
  state.epoch = frame.epoch;
  state.online = true;
  outbox.tokens = Math.min(outbox.tokens, outbox.burst);
  setStatus('online');
  $('whoami').textContent = `signed in as ${frame.user}`;
  $('whoami').title = frame.user;
  $('whoami').hidden = false;
  request({ type: 'who', watch: true });
  request({ type: 'inbox' });
  // Rejoin every room, resuming after the last message seen so nothing is missed.
  for (const [room, conv] of state.rooms) {
    request(conv.loaded && conv.lastId > 0 ? { type: 'join', room, since: conv.lastId } : { type: 'join', room });
  }
  // What a private conversation missed while we were away; the newest page of the one in view.
  for (const [partner, conv] of state.dms) {
    if (conv.loaded && conv.lastId > 0) requestHistory('dm', partner, 'after', conv.lastId);
  }
  if (state.view && state.view.kind === 'dm' && !convOf('dm', state.view.name).loaded) {
    requestHistory('dm', state.view.name, 'before');
  }
  pumpSends();
  mark('all');
}

// Protocol 1.1: a new epoch means the store started again (an in-memory store restarted) and
// its ids with it. Every id the page remembers belongs to the old store: forget them all, so
// that new messages with the same ids are not taken for ones already shown, and load history
// afresh. Messages not yet acknowledged stay and are sent again.
function newEpoch() {
  for (const [room, conv] of state.rooms) {
    const fresh = conversation('room', room);
    fresh.unread = 0;
    state.rooms.set(room, fresh);
    for (const timer of conv.typing.values()) clearTimeout(timer);
  }
  for (const conv of state.dms.values()) for (const timer of conv.typing.values()) clearTimeout(timer);
  state.dms.clear();
  state.dmOrder = [];
  for (const p of state.pending.values()) {
    p.after = null; // shown after whatever the new history holds
    if (p.status === 'acked') setPending(p, 'queued');
    p.id = 0;
  }
  showNotice('The server restarted without its history: earlier messages are gone. New ones are shown as they come.', 15_000);
  mark('all', 'rebuild');
}

function insertId(conv, id) {
  const ids = conv.ids;
  if (ids.length === 0 || id > ids[ids.length - 1]) { ids.push(id); return; }
  let lo = 0;
  let hi = ids.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (ids[mid] < id) lo = mid + 1; else hi = mid;
  }
  ids.splice(lo, 0, id);
}

// Adds messages to a conversation; returns the new ones.
function addMessages(conv, messages) {
  const added = [];
  for (const m of messages) {
    if (conv.messages.has(m.id)) continue;
    conv.messages.set(m.id, m);
    insertId(conv, m.id);
    conv.lastId = Math.max(conv.lastId, m.id);
    added.push(m);
  }
  if (added.length > 0) {
    // A pending message of ours whose id is now here has arrived.
    for (const [ref, p] of state.pending) {
      if (p.id && p.kind === conv.kind && p.name === conv.name && conv.messages.has(p.id)) removePending(ref);
    }
    if (isViewing(conv.kind, conv.name)) viewAdd(added);
  }
  return added;
}

function countUnread(conv, messages) {
  if (isViewing(conv.kind, conv.name) && !document.hidden) return;
  const n = messages.filter((m) => m.from !== state.me).length;
  if (n > 0) {
    conv.unread += n;
    mark(conv.kind === 'room' ? 'rooms' : 'dms');
  }
}

function onJoined(frame) {
  const conv = state.rooms.get(frame.room);
  if (!conv) return; // left meanwhile
  forgetControl('join', frame.room);
  conv.joined = true;
  conv.members = new Set(frame.members);
  conv.memberCount = frame.member_count ?? frame.members.length;
  conv.membersMore = conv.memberCount > frame.members.length;
  // `more` means two things (docs/protocol.md): on a plain join, older messages exist; on a
  // resume (`since`), the resume limit cut the missed messages: page on with `history after`
  // (the room's live messages wait until then).
  const resumed = conv.joinSince > 0;
  const added = addMessages(conv, frame.history);
  if (resumed) {
    countUnread(conv, added);
    if (frame.more) requestHistory('room', frame.room, 'after', conv.lastId);
  } else {
    conv.more = frame.more;
    conv.loaded = true;
  }
  if (!state.view) openView('room', frame.room);
  pumpSends();
  markRead();
  mark('rooms', 'members', 'head');
}

function onMember(frame) {
  const conv = state.rooms.get(frame.room);
  if (!conv) return;
  if (frame.event === 'join') {
    if (!conv.members.has(frame.user)) conv.memberCount += 1;
    conv.members.add(frame.user);
  } else if (conv.members.delete(frame.user) || conv.membersMore) {
    conv.memberCount = Math.max(0, conv.memberCount - 1);
  }
  mark('members', 'head');
}

// A large room (protocol 1.1) announces its size instead of every join and leave: the loaded
// pages may be stale, so the list offers to load them again.
function onMemberCount(frame) {
  const conv = state.rooms.get(frame.room);
  if (!conv) return;
  conv.memberCount = frame.count;
  conv.membersMore = conv.memberCount > conv.members.size || conv.membersMore;
  mark('members', 'head');
}

function onMembers(frame) {
  const conv = state.rooms.get(frame.room);
  if (!conv) return;
  forgetControl('members', frame.room);
  for (const user of frame.users) conv.members.add(user);
  conv.memberCount = frame.count;
  conv.membersMore = frame.more;
  mark('members', 'head');
}

function forgetControl(type, room) {
  for (const [ref, entry] of state.control) {
    if (entry.frame.type === type && entry.frame.room === room) { state.control.delete(ref); return; }
  }
}

function loadMoreMembers(room) {
  const conv = state.rooms.get(room);
  if (!conv) return;
  const after = [...conv.members].sort().pop();
  request(after ? { type: 'members', room, after } : { type: 'members', room });
}

function touchDm(partner) {
  const i = state.dmOrder.indexOf(partner);
  if (i !== 0) {
    if (i > 0) state.dmOrder.splice(i, 1);
    state.dmOrder.unshift(partner);
  }
  mark('dms');
}

// A live message or direct message (the echo of one of ours too: matched to its pending
// message by the id its `ack` carries, never by its text).
function onLive(kind, name, frame) {
  if (kind === 'room' && !state.rooms.has(name)) return;
  const conv = convOf(kind, name);
  const added = addMessages(conv, [frame]);
  if (added.length === 0) return;
  // A message that arrives is the end of its author's typing.
  stopTyping(conv, frame.from);
  countUnread(conv, added);
  if (kind === 'dm') {
    conv.serverLast = Math.max(conv.serverLast, frame.id);
    touchDm(name);
  }
  markRead();
}

function onAck(frame) {
  const p = state.pending.get(frame.ref);
  if (!p) return;
  const conv = convOf(p.kind, p.name);
  if (p.kind === 'dm') {
    // The sending connection gets no echo of its own direct message: the ack makes it real.
    removePending(frame.ref);
    addMessages(conv, [{ type: 'direct', id: frame.id, from: state.me, to: p.name, body: p.body, ts: Date.now() }]);
    conv.serverLast = Math.max(conv.serverLast, frame.id);
    conv.sentRead = Math.max(conv.sentRead, frame.id);
    touchDm(p.name);
  } else {
    p.id = frame.id;
    if (conv.messages.has(frame.id)) removePending(frame.ref);
    else setPending(p, 'acked', 'sent');
  }
  pumpSends();
}

const RETRYABLE = new Set(['unavailable']);

function onError(frame) {
  if (frame.code === 'rate_limited') return onRateLimited(frame);
  const p = frame.ref && state.pending.get(frame.ref);
  if (p) {
    if (RETRYABLE.has(frame.code) && p.attempts < 5) {
      p.attempts += 1;
      p.retryAt = Date.now() + 1000 * 2 ** (p.attempts - 1);
      setPending(p, 'queued', `${frame.code}: retrying`);
      schedulePumpSends(p.retryAt - Date.now());
    } else {
      setPending(p, 'failed', `${frame.code}: ${frame.message}`);
    }
    pumpSends();
    return;
  }
  const entry = frame.ref && state.control.get(frame.ref);
  if (entry) {
    state.control.delete(frame.ref);
    const refused = entry.frame;
    if (refused.type === 'history') {
      dropHistoryWait(frame.ref);
      const conv = convOf(refused.room ? 'room' : 'dm', refused.room || refused.with, false);
      if (conv) conv.loadingOlder = false;
    }
    if (refused.type === 'join' && frame.code !== 'unavailable') {
      // Refused for good (forbidden, too many rooms): the room is not ours.
      state.rooms.delete(refused.room);
      saveRooms();
      if (isViewing('room', refused.room)) state.view = null;
      mark('all', 'rebuild');
    } else if (refused.type === 'join') {
      setTimeout(() => { if (state.rooms.has(refused.room)) request(refused); }, 2000);
    }
    if (refused.type === 'read' || refused.type === 'typing') return; // nothing anyone needs to see
  }
  showNotice(`${frame.code}: ${frame.message}`);
}

function requestHistory(kind, name, direction, id) {
  const conv = convOf(kind, name);
  const frame = { type: 'history', limit: HISTORY_PAGE };
  frame[kind === 'room' ? 'room' : 'with'] = name;
  if (id !== undefined) frame[direction] = id;
  if (direction === 'before') {
    if (conv.loadingOlder) return;
    if (request(frame)) conv.loadingOlder = true;
  } else {
    request(frame);
  }
}

function dropHistoryWait(ref) {
  const i = state.historyWait.findIndex((w) => w.ref === ref);
  if (i >= 0) state.historyWait.splice(i, 1);
}

// A `history` reply carries its request's ref (an extension of the protocol): the reply is
// matched to exactly its request, and an error (which carries the ref too) takes exactly that
// request off the wire. A server without the extension answers a connection's frames in the
// order they came, so then the reply belongs to the oldest request for that conversation.
function onHistory(frame) {
  const kind = frame.room ? 'room' : 'dm';
  const name = frame.room || frame.with;
  let i = frame.ref !== undefined ? state.historyWait.findIndex((w) => w.ref === frame.ref) : -1;
  if (i < 0) i = state.historyWait.findIndex((w) => w.kind === kind && w.name === name);
  if (i < 0) i = 0;
  const wait = state.historyWait.splice(i, 1)[0];
  if (wait) state.control.delete(wait.ref);
  const direction = wait ? wait.direction : 'before';
  if (kind === 'room' && !state.rooms.has(name)) return;
  const conv = convOf(kind, name);
  if (direction === 'before') {
    conv.loadingOlder = false;
    const firstPage = !conv.loaded;
    conv.loaded = true;
    // The oldest page read so far decides whether older ones exist.
    if (frame.messages.length === 0 || conv.ids.length === 0 || frame.messages[0].id <= conv.ids[0] || firstPage) conv.more = frame.more;
    addMessages(conv, frame.messages);
    if (kind === 'dm' && frame.messages.length > 0) touchDmIfUnknown(name);
  } else {
    const added = addMessages(conv, frame.messages);
    if (kind === 'room') countUnread(conv, added);
    if (frame.more) requestHistory(kind, name, 'after', conv.lastId);
  }
  mark('view', 'head');
  markRead();
}

function touchDmIfUnknown(partner) {
  if (!state.dmOrder.includes(partner)) { state.dmOrder.push(partner); mark('dms'); }
}

function onInbox(frame) {
  forgetControl('inbox', undefined);
  const order = [];
  for (const c of frame.conversations) {
    const conv = convOf('dm', c.with);
    order.push(c.with);
    conv.serverLast = Math.max(conv.serverLast, c.last_id);
    conv.sentRead = Math.max(conv.sentRead, c.read_id);
    conv.unread = isViewing('dm', c.with) && !document.hidden ? 0 : c.unread;
  }
  // The server's order (most recent first), then any conversation only this page knows yet.
  state.dmOrder = [...order, ...state.dmOrder.filter((p) => !order.includes(p))];
  mark('dms', 'online');
  markRead();
}

function onTyping(frame) {
  const kind = frame.room ? 'room' : 'dm';
  const name = frame.room || frame.from;
  if (kind === 'room' && !state.rooms.has(name)) return;
  const conv = convOf(kind, name);
  clearTimeout(conv.typing.get(frame.from));
  conv.typing.set(frame.from, setTimeout(() => stopTyping(conv, frame.from), TYPING_SHOWN));
  if (isViewing(kind, name)) mark('typing');
}

function stopTyping(conv, user) {
  if (!conv.typing.has(user)) return;
  clearTimeout(conv.typing.get(user));
  conv.typing.delete(user);
  if (isViewing(conv.kind, conv.name)) mark('typing');
}

function onRead(frame) {
  const kind = frame.room ? 'room' : 'dm';
  const name = frame.room || frame.with;
  if (kind === 'room' && !state.rooms.has(name)) return;
  const conv = convOf(kind, name);
  conv.reads.set(frame.user, Math.max(conv.reads.get(frame.user) || 0, frame.id));
  if (isViewing(kind, name)) mark('seen');
}

// ---------- pending messages: retried until acknowledged or shown as failed, never dropped ----------
//
// A pending message is `queued` (waiting for its turn, the connection, or a retry time),
// `inflight` (on the wire), `acked` (stored; its echo is on its way) or `failed` (refused for
// good: it stays where it was written, with "retry" and "discard"). One message per
// conversation is in flight at a time, so they are stored in the order written.

function setPending(p, status, note = null) {
  p.status = status;
  p.note = note;
  if (status !== 'inflight') p.sentAt = 0;
  if (isViewing(p.kind, p.name)) viewPending(p.ref);
  savePending();
}

function removePending(ref) {
  const p = state.pending.get(ref);
  if (!p) return;
  state.pending.delete(ref);
  if (isViewing(p.kind, p.name)) viewPending(ref);
  savePending();
}

function schedulePumpSends(delay) {
  clearTimeout(state.sendTimer);
  state.sendTimer = setTimeout(pumpSends, Math.max(10, delay));
}

function pumpSends() {
  if (!state.online) return;
  const busy = new Set();
  const now = Date.now();
  let nextRetry = Infinity;
  for (const [ref, p] of state.pending) {
    if (p.status === 'failed' || p.status === 'acked') continue;
    const key = keyOf(p.kind, p.name);
    if (busy.has(key)) continue;
    busy.add(key);
    if (p.status === 'inflight') continue;
    if (p.retryAt > now) { nextRetry = Math.min(nextRetry, p.retryAt); continue; }
    if (p.kind === 'room') {
      const conv = state.rooms.get(p.name);
      if (!conv) { setPending(p, 'failed', 'not in this room any more'); continue; }
      if (!conv.joined) continue; // sent once `joined` is here
    }
    setPending(p, 'inflight');
    enqueue(p.kind === 'room'
      ? { type: 'send', room: p.name, body: p.body, ref }
      : { type: 'direct', to: p.name, body: p.body, ref });
  }
  if (nextRetry < Infinity) schedulePumpSends(nextRetry - now);
}

// A send with no answer for a while (a server that took it and then died, say) is sent again
// with the same ref: the server stores a ref once, however often it comes.
function armAckTimer() {
  if (state.ackTimer) return;
  state.ackTimer = setTimeout(() => {
    state.ackTimer = null;
    if (!state.online) return;
    const now = Date.now();
    let waiting = false;
    for (const p of state.pending.values()) {
      if (p.status !== 'inflight' || !p.sentAt) continue;
      if (now - p.sentAt >= ACK_TIMEOUT) setPending(p, 'queued', 'no answer yet: resending');
      else waiting = true;
    }
    pumpSends();
    if (waiting) armAckTimer();
  }, ACK_TIMEOUT / 2);
}

function savePending() {
  if (!state.me) return;
  const list = [...state.pending.values()].map((p) => ({ ref: p.ref, kind: p.kind, name: p.name, body: p.body, ts: p.ts }));
  try { sessionStorage.setItem(`chat.pending.${state.me}`, JSON.stringify(list)); } catch { /* full: kept in memory */ }
}

// ---------- actions ----------

function isViewing(kind, name) {
  return state.view !== null && state.view.kind === kind && state.view.name === name;
}

function joinRoom(room) {
  if (!ROOM.test(room)) return showNotice('Room names are 1-100 letters, digits, dots, dashes or underscores.');
  if (!state.rooms.has(room)) {
    convOf('room', room);
    saveRooms();
    request({ type: 'join', room });
  }
  openView('room', room);
  return undefined;
}

function leaveRoom(room) {
  request({ type: 'leave', room });
  const conv = state.rooms.get(room);
  if (conv) for (const timer of conv.typing.values()) clearTimeout(timer);
  state.rooms.delete(room);
  for (const [ref, p] of state.pending) if (p.kind === 'room' && p.name === room) state.pending.delete(ref);
  savePending();
  saveRooms();
  state.view = null;
  const next = state.rooms.keys().next();
  if (!next.done) openView('room', next.value);
  else mark('all', 'rebuild');
}

function writeTo(name) {
  if (!NAME.test(name)) return showNotice('Names are 1-64 letters, digits, dots, dashes or underscores.');
  if (name === state.me) return showNotice('That is you: write to someone else.');
  openView('dm', name);
  return undefined;
}

function openView(kind, name) {
  state.view = { kind, name };
  const conv = convOf(kind, name);
  conv.unread = 0;
  if (kind === 'dm') {
    touchDmIfUnknown(name);
    if (!conv.loaded) requestHistory('dm', name, 'before');
  }
  mark('all', 'rebuild');
  if (window.matchMedia('(max-width: 760px)').matches) $('view').scrollIntoView({ block: 'start' });
  $('composer').focus();
}

function bodyLength(text) {
  let n = 0;
  for (const _ of text) n += 1; // Unicode scalar values, as the server counts
  return n;
}

function submitComposer() {
  const input = $('composer');
  const body = input.value;
  if (!body.trim() || !state.view) return;
  if (bodyLength(body) > MAX_BODY) { updateCount(); return; }
  const { kind, name } = state.view;
  const conv = convOf(kind, name);
  const ref = newRef();
  const p = { ref, kind, name, body, ts: Date.now(), id: 0, status: 'queued', note: null, attempts: 0, retryAt: 0, sentAt: 0, after: conv.lastId, seq: ++state.seq };
  state.pending.set(ref, p);
  savePending();
  if (isViewing(kind, name)) viewPending(ref);
  view.follow = true; // one's own message always scrolls into view
  input.value = '';
  autosize();
  updateCount();
  // The next keystroke announces typing again at once.
  state.typingAt = 0;
  stopTyping(conv, state.me);
  pumpSends();
}

function retryPending(ref) {
  const p = state.pending.get(ref);
  if (!p) return;
  p.attempts = 0;
  p.retryAt = 0;
  // Taken as a new message: to the end of its conversation's queue.
  state.pending.delete(ref);
  state.pending.set(ref, p);
  setPending(p, 'queued');
  pumpSends();
}

function onComposerInput() {
  autosize();
  updateCount();
  if (!state.view || !$('composer').value) return;
  const { kind, name } = state.view;
  const key = keyOf(kind, name);
  const now = Date.now();
  if (state.typingKey === key && now - state.typingAt < TYPING_EVERY) return;
  const ref = newRef();
  const frame = kind === 'room' ? { type: 'typing', room: name, ref } : { type: 'typing', to: name, ref };
  if (kind === 'room' && !(state.rooms.get(name) || {}).joined) return;
  if (sendNowOrDrop(frame)) {
    state.typingKey = key;
    state.typingAt = now;
  }
}

function autosize() {
  const input = $('composer');
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight + 2, 160)}px`;
}

// Over the limit, the box says by how much before anything is sent, and Send waits.
function updateCount() {
  const count = $('composer-count');
  const n = bodyLength($('composer').value);
  const over = n - MAX_BODY;
  count.hidden = n < SHOW_COUNT_FROM;
  count.dataset.over = String(over > 0);
  count.textContent = over > 0
    ? `${n.toLocaleString('en')} characters: ${over.toLocaleString('en')} over the limit of ${MAX_BODY.toLocaleString('en')}. Shorten it to send.`
    : `${n.toLocaleString('en')} / ${MAX_BODY.toLocaleString('en')} characters`;
  $('send').disabled = over > 0;
}

// Read receipts: the highest id of the conversation in view, once the reader is at its end,
// sent at most once a second (the latest wins), so receiving never doubles the traffic.
function markRead() {
  if (!state.view || document.hidden || !view.stuck) return;
  const conv = convOf(state.view.kind, state.view.name);
  if (conv.lastId > conv.wantRead) conv.wantRead = conv.lastId;
  if (conv.wantRead > conv.sentRead) scheduleReads();
}

function scheduleReads(atLeast = 0) {
  if (state.readTimer) return;
  const wait = Math.max(atLeast, state.lastReadSent + READ_EVERY - Date.now());
  state.readTimer = setTimeout(flushReads, Math.max(0, wait));
}

function flushReads() {
  state.readTimer = null;
  if (!state.online) return;
  let sent = false;
  for (const conv of [...state.rooms.values(), ...state.dms.values()]) {
    if (conv.wantRead <= conv.sentRead) continue;
    if (conv.kind === 'room' && !conv.joined) continue;
    const frame = conv.kind === 'room'
      ? { type: 'read', room: conv.name, id: conv.wantRead, prevRead: conv.sentRead }
      : { type: 'read', with: conv.name, id: conv.wantRead, prevRead: conv.sentRead };
    if (request(frame)) {
      conv.sentRead = conv.wantRead;
      sent = true;
    }
  }
  if (sent) state.lastReadSent = Date.now();
}

// ---------- rendering ----------

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('data-') || k === 'title') node.setAttribute(k, v);
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

function nameSpan(name, text = name) {
  return el('span', { class: 'name', title: name }, text);
}

function flush() {
  flushTimer = null;
  const parts = new Set(dirty);
  dirty.clear();
  const all = parts.has('all');
  const anchor = parts.has('rebuild') ? null : captureAnchor();
  if (all || parts.has('rooms')) renderRooms();
  if (all || parts.has('online') || parts.has('dms')) renderOnline();
  if (all || parts.has('dms')) renderInbox();
  if (all || parts.has('head')) renderHead();
  if (all || parts.has('members')) renderMembers();
  if (all || parts.has('typing')) renderTyping();
  if (parts.has('rebuild')) rebuildView();
  else applyView();
  if (all || parts.has('seen') || parts.has('view')) renderSeen();
  renderNotice();
  if (anchor) restoreAnchor(anchor);
}

// Keeps the reading position across a flush: note where the first message in sight is, change
// the list, and put that message back where it was (loading older messages above it, or the
// "Load older" button going away, moves nothing). A reader at the end stays at the end.
function captureAnchor() {
  const list = $('messages');
  if (view.stuck || view.follow || !state.view) return { stuck: true };
  const top = list.scrollTop;
  for (const item of view.items) {
    const node = item.node;
    if (node.offsetTop + node.offsetHeight > top) return { node, offset: node.offsetTop - top };
  }
  return null;
}

function restoreAnchor(anchor) {
  const list = $('messages');
  if (anchor.stuck) {
    list.scrollTop = list.scrollHeight;
    view.stuck = true;
    view.newBelow = 0;
  } else if (anchor.node.isConnected) {
    list.scrollTop = anchor.node.offsetTop - anchor.offset;
  }
  view.follow = false;
  renderJump();
}

// The side lists are updated in place, element by element (keyed by name), never replaced
// wholesale: a click that lands while a list is being updated still reaches its element (a
// replaced element between mousedown and mouseup loses the click).
function syncList(list, entries) {
  const old = new Map();
  for (const node of list.children) old.set(node.dataset.key, node);
  let prev = null;
  for (const entry of entries) {
    let node = old.get(entry.key);
    if (node) old.delete(entry.key);
    else {
      node = entry.build();
      node.dataset.key = entry.key;
    }
    if (entry.fill) entry.fill(node);
    const want = prev ? prev.nextSibling : list.firstChild;
    if (node !== want) list.insertBefore(node, want);
    prev = node;
  }
  for (const node of old.values()) node.remove();
}

// A list item that opens a conversation: a name, an unread badge, "current" when in view.
function conversationEntry(key, attrs, label, open, unread, current) {
  return {
    key,
    build: () => {
      const li = clickable(el('li', attrs), open);
      li.append(nameSpan(label.title, label.text), badge(0));
      return li;
    },
    fill: (li) => {
      const b = li.querySelector('.unread');
      b.textContent = String(unread);
      b.hidden = unread === 0;
      if (current) li.setAttribute('aria-current', 'true'); else li.removeAttribute('aria-current');
    },
  };
}

function meEntry(user) {
  return {
    key: `me:${user}`,
    build: () => {
      const li = el('li', { 'data-user': user, class: 'me' });
      li.append(nameSpan(user, `${user} (you)`));
      return li;
    },
  };
}

function renderRooms() {
  syncList($('rooms'), [...state.rooms.keys()].sort().map((room) => conversationEntry(
    `room:${room}`, { 'data-room': room }, { title: room, text: `# ${room}` },
    () => openView('room', room), state.rooms.get(room).unread, isViewing('room', room))));
}

function renderOnline() {
  const hidden = Math.max(0, state.onlineCount - state.users.size);
  $('online-title').textContent = state.onlineCount > 0 ? `Online (${state.onlineCount})` : 'Online';
  const entries = [...state.users].sort().map((user) => {
    if (user === state.me) return meEntry(user);
    const conv = state.dms.get(user);
    return conversationEntry(`user:${user}`, { 'data-user': user }, { title: user, text: user },
      () => openView('dm', user), conv ? conv.unread : 0, isViewing('dm', user));
  });
  if (hidden > 0) {
    entries.push({
      key: 'more',
      build: () => el('li', { class: 'more-users' }),
      fill: (li) => { li.textContent = `and ${hidden} more`; },
    });
  }
  syncList($('online'), entries);
}

function renderInbox() {
  const entries = state.dmOrder.filter((p) => state.dms.has(p)).map((partner) => conversationEntry(
    `with:${partner}`, { 'data-with': partner }, { title: partner, text: partner },
    () => openView('dm', partner), state.dms.get(partner).unread, isViewing('dm', partner)));
  if (entries.length === 0) {
    entries.push({ key: 'empty', build: () => el('li', { class: 'empty-list' }, 'No private messages yet.') });
  }
  syncList($('inbox'), entries);
}

function renderHead() {
  const title = $('view-title');
  const count = $('view-count');
  const app = $('app');
  if (!state.view) {
    title.textContent = 'Pick a room or a person';
    title.removeAttribute('title');
    count.hidden = true;
    $('composer-form').hidden = true;
    $('leave').hidden = true;
    $('load-older').hidden = true;
    $('members-panel').hidden = true;
    app.classList.add('no-members');
    return;
  }
  const { kind, name } = state.view;
  const conv = convOf(kind, name);
  title.textContent = kind === 'room' ? `# ${name}` : `${name} (private)`;
  title.title = name;
  count.hidden = kind !== 'room' || conv.memberCount === 0;
  count.textContent = `${conv.memberCount} member${conv.memberCount === 1 ? '' : 's'}`;
  $('composer-form').hidden = false;
  $('leave').hidden = kind !== 'room';
  $('load-older').hidden = !conv.loaded || !conv.more || conv.ids.length === 0;
  $('load-older').disabled = conv.loadingOlder;
  // The member list belongs to rooms: a private conversation has none.
  $('members-panel').hidden = kind !== 'room';
  app.classList.toggle('no-members', kind !== 'room');
}

function renderMembers() {
  const room = state.view && state.view.kind === 'room' ? state.view.name : null;
  const conv = room ? state.rooms.get(room) : null;
  $('members-title').textContent = conv ? `In this room (${conv.memberCount})` : 'In this room';
  const entries = (conv ? [...conv.members].sort() : []).map((user) => {
    if (user === state.me) return meEntry(user);
    return {
      key: `user:${user}`,
      build: () => {
        const li = clickable(el('li', { 'data-user': user }), () => openView('dm', user));
        li.append(nameSpan(user));
        return li;
      },
    };
  });
  if (conv && conv.membersMore) {
    entries.push({
      key: `more:${room}`,
      build: () => {
        const more = el('button', { type: 'button', class: 'link', id: 'more-members' }, 'Show more');
        more.addEventListener('click', () => loadMoreMembers(room));
        const li = el('li', { class: 'static' });
        li.append(more);
        return li;
      },
    });
  }
  syncList($('members'), entries);
}

function renderTyping() {
  const line = $('typing');
  if (!state.view) { line.textContent = ''; return; }
  const conv = convOf(state.view.kind, state.view.name);
  const who = [...conv.typing.keys()].filter((u) => u !== state.me);
  line.textContent = who.length === 0 ? ''
    : who.length > 3 ? `${who.length} people are typing…`
      : `${who.join(', ')} ${who.length === 1 ? 'is' : 'are'} typing…`;
}

function showNotice(text, ms = 5000) {
  clearTimeout(state.noticeTimer);
  state.notice = text;
  state.noticeTimer = setTimeout(() => { state.notice = null; mark('notice'); }, ms);
  mark('notice');
}

function renderNotice() {
  const node = $('notice');
  node.hidden = !state.notice;
  node.textContent = state.notice || '';
}

// The message list of the conversation in view is drawn once when the view opens, then kept up
// to date one element at a time: a new message is one insertion, never a re-sort or a redraw.
// Items are ordered by (id, 0) for messages and (id shown when written, seq) for pending ones,
// so a failed message stays where it was written while newer ones arrive below it.

const view = {
  key: null,
  items: [], // sorted: { a, b, node, id?, ref? }
  changes: [], // { id } | { ref } since the last flush
  stuck: true, // the reader is at the end: new messages scroll into view
  follow: false,
  newBelow: 0,
};

function viewAdd(messages) {
  for (const m of messages) view.changes.push({ id: m.id });
  mark('view');
}

function viewPending(ref) {
  view.changes.push({ ref });
  mark('view');
}

function compareItem(x, a, b) {
  return x.a !== a ? x.a - a : x.b - b;
}

function findItem(a, b) {
  let lo = 0;
  let hi = view.items.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (compareItem(view.items[mid], a, b) < 0) lo = mid + 1; else hi = mid;
  }
  return lo;
}

function pendingPlace(p) {
  return { a: p.after === null ? Number.MAX_SAFE_INTEGER : p.after, b: p.seq };
}

function messageNode(m) {
  const mine = m.from === state.me;
  const li = el('li', { class: `message${mine ? ' mine' : ''}`, 'data-from': m.from, 'data-id': String(m.id) });
  const meta = el('div', { class: 'meta' });
  meta.append(el('span', { class: 'author', title: m.from }, m.from));
  if (m.ts) meta.append(el('time', { dateTime: new Date(m.ts).toISOString(), title: new Date(m.ts).toLocaleString() }, new Date(m.ts).toLocaleTimeString()));
  li.append(meta, el('div', { class: 'body' }, m.body));
  return li;
}

function pendingNode(p) {
  const li = el('li', { class: 'message mine', 'data-from': state.me || '', 'data-pending': 'true', 'data-ref': p.ref });
  const meta = el('div', { class: 'meta' });
  meta.append(el('span', { class: 'author', title: state.me || '' }, state.me || ''));
  li.append(meta, el('div', { class: 'body' }, p.body));
  const status = el('div', { class: 'status' });
  if (p.status === 'failed') {
    li.dataset.failed = 'true';
    status.append(el('span', {}, `not sent: ${p.note}`));
    const retry = el('button', { type: 'button', class: 'link retry' }, 'retry');
    retry.addEventListener('click', () => retryPending(p.ref));
    const discard = el('button', { type: 'button', class: 'link discard' }, 'discard');
    discard.addEventListener('click', () => removePending(p.ref));
    status.append(retry, discard);
  } else {
    status.append(el('span', {}, p.note || (state.online ? 'sending…' : 'waiting for the connection…')));
  }
  li.append(status);
  return li;
}

function insertItem(item) {
  const i = findItem(item.a, item.b);
  const list = $('messages');
  const before = i < view.items.length ? view.items[i].node : $('seen-line');
  list.insertBefore(item.node, before);
  view.items.splice(i, 0, item);
}

function removeItemAt(i) {
  view.items[i].node.remove();
  view.items.splice(i, 1);
}

function rebuildView() {
  const list = $('messages');
  view.items = [];
  view.changes = [];
  view.newBelow = 0;
  view.key = state.view ? keyOf(state.view.kind, state.view.name) : null;
  const empty = el('li', { class: 'empty', id: 'empty-line' });
  const seen = el('li', { class: 'seen', id: 'seen-line' });
  list.replaceChildren($('older-line'), empty, seen);
  if (state.view) {
    const conv = convOf(state.view.kind, state.view.name);
    const nodes = [];
    for (const id of conv.ids) {
      const item = { a: id, b: 0, id, node: messageNode(conv.messages.get(id)) };
      view.items.push(item);
      nodes.push(item.node);
    }
    seen.before(...nodes);
    for (const p of state.pending.values()) {
      if (p.kind !== state.view.kind || p.name !== state.view.name) continue;
      if (p.id && conv.messages.has(p.id)) continue;
      insertItem({ ...pendingPlace(p), ref: p.ref, node: pendingNode(p) });
    }
  }
  renderEmpty();
  list.scrollTop = list.scrollHeight;
  view.stuck = true;
  view.follow = false;
  renderJump();
  renderSeen();
  markRead();
}

function applyView() {
  const key = state.view ? keyOf(state.view.kind, state.view.name) : null;
  if (key !== view.key) { rebuildView(); return; }
  if (view.changes.length === 0 && !view.follow) { renderEmpty(); return; }
  const conv = convOf(state.view.kind, state.view.name);
  const last = view.items.length > 0 ? view.items[view.items.length - 1] : null;
  let addedBelow = 0;
  for (const change of view.changes) {
    if (change.id !== undefined) {
      const m = conv.messages.get(change.id);
      if (!m) continue;
      const i = findItem(change.id, 0);
      if (i < view.items.length && view.items[i].a === change.id && view.items[i].b === 0) continue;
      const item = { a: change.id, b: 0, id: change.id, node: messageNode(m) };
      insertItem(item);
      if (!last || compareItem(last, item.a, item.b) < 0) addedBelow += m.from === state.me ? 0 : 1;
    } else {
      const idx = view.items.findIndex((it) => it.ref === change.ref);
      const p = state.pending.get(change.ref);
      const show = p && p.kind === state.view.kind && p.name === state.view.name && !(p.id && conv.messages.has(p.id));
      if (idx >= 0 && (!show || compareItem(view.items[idx], pendingPlace(p).a, pendingPlace(p).b) !== 0)) removeItemAt(idx);
      if (show) {
        const j = view.items.findIndex((it) => it.ref === change.ref);
        if (j >= 0) {
          const node = pendingNode(p);
          view.items[j].node.replaceWith(node);
          view.items[j].node = node;
        } else {
          insertItem({ ...pendingPlace(p), ref: p.ref, node: pendingNode(p) });
        }
      }
    }
  }
  view.changes = [];
  renderEmpty();
  if (!view.stuck && !view.follow) view.newBelow += addedBelow;
}

function renderEmpty() {
  const empty = $('empty-line');
  if (!empty) return;
  const conv = state.view ? convOf(state.view.kind, state.view.name) : null;
  if (!conv) { empty.hidden = true; return; }
  empty.hidden = view.items.length > 0;
  empty.textContent = !conv.loaded ? 'Loading…'
    : conv.kind === 'room' ? 'No messages in this room yet. Say hello!' : `No messages with ${conv.name} yet. Write the first one.`;
}

function renderJump() {
  const jump = $('jump');
  jump.hidden = view.stuck || view.newBelow === 0;
  jump.textContent = `${view.newBelow} new message${view.newBelow === 1 ? '' : 's'} ↓`;
}

function renderSeen() {
  const line = $('seen-line');
  if (!line || !state.view) return;
  const conv = convOf(state.view.kind, state.view.name);
  const lastId = conv.lastId;
  const readers = lastId === 0 ? [] : [...conv.reads]
    .filter(([user, id]) => user !== state.me && id >= lastId)
    .map(([user]) => user)
    .sort();
  line.replaceChildren();
  line.removeAttribute('title');
  line.hidden = readers.length === 0;
  if (readers.length === 0) return;
  if (conv.kind === 'dm') {
    line.textContent = 'seen';
  } else if (readers.length <= SEEN_NAMES) {
    line.textContent = `seen by ${readers.join(', ')}`;
    line.title = readers.join(', ');
  } else {
    const details = el('details');
    details.append(el('summary', {}, `seen by ${readers.length}`), el('span', { class: 'names' }, readers.join(', ')));
    line.append(details);
  }
  // The line sits at the end of the list: keep the end in view for a reader who is there.
  if (view.stuck) $('messages').scrollTop = $('messages').scrollHeight;
}

function onScroll() {
  const list = $('messages');
  const stuck = list.scrollHeight - list.scrollTop - list.clientHeight < AT_BOTTOM;
  if (stuck === view.stuck) return;
  view.stuck = stuck;
  if (stuck) {
    view.newBelow = 0;
    markRead();
  }
  renderJump();
}

// ---------- sign-in and start-up ----------

function saveRooms() {
  if (!state.me) return;
  sessionStorage.setItem(`chat.rooms.${state.me}`, JSON.stringify([...state.rooms.keys()]));
}

// What this tab remembers for this user (sessionStorage: gone when the tab closes): the rooms,
// and messages written but not acknowledged yet, which are sent again (same ref, so at most once).
function restoreSaved() {
  try {
    for (const room of JSON.parse(sessionStorage.getItem(`chat.rooms.${state.me}`) || '[]')) {
      if (ROOM.test(room)) convOf('room', room);
    }
    for (const saved of JSON.parse(sessionStorage.getItem(`chat.pending.${state.me}`) || '[]')) {
      if (state.pending.has(saved.ref) || typeof saved.body !== 'string') continue;
      if (saved.kind === 'room' ? !state.rooms.has(saved.name) : !NAME.test(saved.name)) continue;
      state.pending.set(saved.ref, { ref: saved.ref, kind: saved.kind, name: saved.name, body: saved.body, ts: saved.ts, id: 0, status: 'queued', note: null, attempts: 0, retryAt: 0, sentAt: 0, after: null, seq: ++state.seq });
    }
  } catch { /* unreadable: start afresh */ }
  saveRooms();
}

function signIn(credential) {
  state.credential = credential;
  sessionStorage.setItem('chat.credential', credential);
  $('signin').hidden = true;
  $('app').hidden = false;
  $('signout').hidden = false;
  $('signin-error').textContent = '';
  mark('all', 'rebuild');
  connect();
}

// Forgets everything about the user: nothing carries over to whoever signs in next on this tab.
function signOut(message = '', status = 'offline') {
  if (state.me) {
    sessionStorage.removeItem(`chat.rooms.${state.me}`);
    sessionStorage.removeItem(`chat.pending.${state.me}`);
  }
  sessionStorage.removeItem('chat.credential');
  const socket = state.socket;
  state.socket = null;
  if (socket) socket.close(1000);
  connectionLost();
  for (const timer of [state.retryTimer, state.sendTimer, state.noticeTimer]) clearTimeout(timer);
  for (const conv of [...state.rooms.values(), ...state.dms.values()]) for (const t of conv.typing.values()) clearTimeout(t);
  Object.assign(state, {
    credential: null, me: null, admitted: false, refusals: 0, epoch: null, backoff: 500, retryTimer: null,
    rooms: new Map(), dms: new Map(), dmOrder: [], users: new Set(), onlineCount: 0, view: null,
    pending: new Map(), typingKey: null, typingAt: 0, sendTimer: null, notice: null, noticeTimer: null, lastReadSent: 0,
  });
  Object.assign(outbox, { tokens: BUCKET_BURST, rate: BUCKET_RATE, burst: BUCKET_BURST, last: 0, pausedUntil: 0, limitedAt: 0, grownAt: 0 });
  $('composer').value = '';
  updateCount();
  $('app').hidden = true;
  $('signout').hidden = true;
  $('whoami').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message;
  setStatus(status, status === 'refused' ? 'sign-in refused' : 'offline');
  mark('all', 'rebuild');
}

async function start() {
  sessionStorage.removeItem('chat.rooms'); // an older page kept one list for every user
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
      const exp = tokenExpiry(token);
      if (exp !== null && exp <= Date.now()) { $('signin-error').textContent = 'This token has expired.'; return; }
      $('signin-token').value = '';
      signIn(token);
    }
  });
  $('signout').addEventListener('click', () => signOut());
  $('room-form').addEventListener('submit', (e) => {
    e.preventDefault();
    joinRoom($('room-name').value.trim());
    $('room-name').value = '';
  });
  $('dm-form').addEventListener('submit', (e) => {
    e.preventDefault();
    writeTo($('dm-name').value.trim());
    $('dm-name').value = '';
  });
  $('leave').addEventListener('click', () => state.view && leaveRoom(state.view.name));
  $('load-older').addEventListener('click', () => {
    if (!state.view) return;
    const conv = convOf(state.view.kind, state.view.name);
    if (conv.ids.length === 0) return;
    requestHistory(state.view.kind, state.view.name, 'before', conv.ids[0]);
    mark('head');
  });
  $('jump').addEventListener('click', () => {
    const list = $('messages');
    list.scrollTop = list.scrollHeight;
  });
  $('messages').addEventListener('scroll', onScroll, { passive: true });
  $('composer-form').addEventListener('submit', (e) => { e.preventDefault(); submitComposer(); });
  $('composer').addEventListener('input', onComposerInput);
  $('composer').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submitComposer();
    }
  });
  document.addEventListener('visibilitychange', () => {
    if (document.hidden || !state.view) return;
    convOf(state.view.kind, state.view.name).unread = 0;
    mark('rooms', 'dms');
    markRead();
  });
  // The browser knows before the socket does: reconnect as soon as the network is back.
  window.addEventListener('online', () => { if (!state.socket && state.credential) connect(); });

  updateCount();
  const saved = sessionStorage.getItem('chat.credential');
  if (saved) signIn(saved);
}

start();
