// @ts-check
/**
 * driftsync's chat schema over plain Yjs: the same rooms the Rust client (`engine::chat`)
 * reads and writes, and that the server checks under its chat rules (ARCHITECTURE.md, "Chat
 * and receipts schema"). Nothing here talks to a server: give it a `Y.Doc` that any provider
 * syncs (the page uses `@hocuspocus/provider` against driftsync's `/hocuspocus`).
 *
 * A room document has these root maps:
 * - `messages`: message id (UUIDv7) → a nested `Y.Map` with `id`, `author`, `device`, `client`,
 *   `text`, `created`, `hlc`, `sort`, optionally `kind` (text, image, video, file; `system` is
 *   the server's), `meta` (an object of strings), `attachments` (`[{url, mime, size, sha256?,
 *   width?, height?}]`) and `reply_to` (a message id), and once edited or deleted, `edited` and
 *   `deleted`;
 * - `receipts`: `"{user}/{device}"` → `{ message, sort, at }`, "read up to and including";
 * - `delivered`: the same shape, "received on this device up to and including";
 * - `reactions`: `"{message}/{reaction}/{user}"` → `{ at }`, one user's reaction to a message.
 *
 * Display order is ascending `sort` (`{hlc}/{client:016}/{id}`) compared as strings, which every
 * replica computes alike: the same messages in the same order everywhere.
 */

import * as Y from 'yjs'

export const MESSAGES_ROOT = 'messages'
export const RECEIPTS_ROOT = 'receipts'
export const DELIVERED_ROOT = 'delivered'
export const REACTIONS_ROOT = 'reactions'
export const MEMBERS_ROOT = 'members'
/** The kinds a client may send (`system` messages are written by the server). */
export const KINDS = ['text', 'image', 'video', 'file']

/** Largest wall-clock part of a stamp: 15 decimal digits. */
export const MAX_WALL_MS = 999_999_999_999_999
/** Largest counter part of a stamp (the server refuses larger ones). */
export const MAX_COUNTER = 2 ** 31 - 1
/** A stamp seen from a replica further ahead of our clock than this is not followed. */
export const MAX_OBSERVED_AHEAD_MS = 24 * 60 * 60 * 1000

/**
 * A hybrid logical clock stamp.
 * @typedef {{ wall: number, counter: number }} Hlc
 */

/**
 * A message as it is displayed.
 * @typedef {object} Message
 * @property {string} id UUIDv7, also its key in `messages`
 * @property {string} author the author's user id (the token's subject)
 * @property {string} device the sending device
 * @property {number} client the Yjs client id of the sending replica
 * @property {string} text `""` once deleted
 * @property {number} created the sender's wall clock, ms since the Unix epoch
 * @property {string} hlc the stamp, `WWWWWWWWWWWWWWW.CCCCCCCCCC`
 * @property {string} sort the order key
 * @property {number | undefined} edited ms of the last edit or deletion
 * @property {boolean} deleted
 * @property {string} kind `text`, `image`, `video`, `file` or `system`
 * @property {Record<string, string>} meta
 * @property {Attachment[]} attachments
 * @property {string | undefined} replyTo the id of the message it answers
 * @property {Y.Map<any>} map the message's `Y.Map` (its `_item.id` says which replica wrote it)
 */

/**
 * A file a message refers to; its bytes live at `url`.
 * @typedef {{ url: string, mime: string, size: number, sha256?: string, width?: number, height?: number }} Attachment
 */

/**
 * What a message carries besides its text (all optional).
 * @typedef {{ kind?: string, meta?: Record<string, string>, attachments?: Attachment[], replyTo?: string }} Details
 */

/**
 * A user's read receipt: the greatest among their devices.
 * @typedef {{ user: string, device: string, message: string, sort: string, at: number }} Receipt
 */

/**
 * The stamp as the schema writes it: 15 digits of wall ms, `.`, 10 digits of counter.
 * @param {Hlc} hlc
 * @returns {string}
 */
export function hlcKey(hlc) {
  const wall = Math.min(hlc.wall, MAX_WALL_MS)
  return `${String(wall).padStart(15, '0')}.${String(hlc.counter).padStart(10, '0')}`
}

/**
 * Parses a stamp written by {@link hlcKey}; `null` when it is not one.
 * @param {unknown} key
 * @returns {Hlc | null}
 */
export function parseHlc(key) {
  if (typeof key !== 'string' || !/^\d{15}\.\d{10}$/.test(key)) return null
  const [wall, counter] = key.split('.').map(Number)
  return { wall, counter }
}

/**
 * @param {Hlc} a
 * @param {Hlc} b
 * @returns {number} negative, zero or positive
 */
export function compareHlc(a, b) {
  return a.wall !== b.wall ? a.wall - b.wall : a.counter - b.counter
}

/**
 * The display-order key of a message.
 * @param {Hlc} hlc
 * @param {number} client
 * @param {string} id
 * @returns {string}
 */
export function sortKey(hlc, client, id) {
  return `${hlcKey(hlc)}/${String(client).padStart(16, '0')}/${id}`
}

/** @param {Hlc} hlc @returns {Hlc} */
function successor(hlc) {
  if (hlc.counter < MAX_COUNTER) return { wall: hlc.wall, counter: hlc.counter + 1 }
  if (hlc.wall < MAX_WALL_MS) return { wall: hlc.wall + 1, counter: 0 }
  return { wall: MAX_WALL_MS, counter: MAX_COUNTER }
}

/**
 * A hybrid logical clock, as `engine::clock::HlcClock`: every stamp it issues is greater than
 * every stamp it issued or observed before (unless an observed one is more than a day ahead of
 * the wall clock: a broken device cannot drag everyone's stamps into the future).
 */
export class HlcClock {
  constructor() {
    /** @type {Hlc} */
    this.issued = { wall: 0, counter: 0 }
    /** @type {Hlc} */
    this.seen = { wall: 0, counter: 0 }
  }

  /** The greatest stamp issued or observed. @returns {Hlc} */
  last() {
    return compareHlc(this.issued, this.seen) >= 0 ? this.issued : this.seen
  }

  /**
   * A new stamp for an event at wall time `nowMs`.
   * @param {number} nowMs
   * @returns {Hlc}
   */
  tick(nowMs) {
    const now = Math.min(Math.max(0, Math.floor(nowMs)), MAX_WALL_MS)
    const base = this.seen.wall <= now + MAX_OBSERVED_AHEAD_MS ? this.last() : this.issued
    this.issued = now > base.wall ? { wall: now, counter: 0 } : successor(base)
    return this.issued
  }

  /**
   * Takes in a stamp seen on another replica's message.
   * @param {Hlc} remote
   */
  observe(remote) {
    let hlc = remote
    if (hlc.wall > MAX_WALL_MS) hlc = { wall: MAX_WALL_MS, counter: MAX_COUNTER }
    else if (hlc.counter > MAX_COUNTER) hlc = successor({ wall: hlc.wall, counter: MAX_COUNTER })
    if (compareHlc(hlc, this.seen) > 0) this.seen = hlc
  }
}

/**
 * A UUIDv7 (RFC 9562): 48 bits of Unix ms, then random bits; lowercase, hyphenated.
 * @param {number} [nowMs]
 * @returns {string}
 */
export function uuidv7(nowMs = Date.now()) {
  const bytes = new Uint8Array(16)
  globalThis.crypto.getRandomValues(bytes)
  let ms = Math.max(0, Math.floor(nowMs))
  for (let i = 5; i >= 0; i--) {
    bytes[i] = ms % 256
    ms = Math.floor(ms / 256)
  }
  bytes[6] = 0x70 | (bytes[6] & 0x0f)
  bytes[8] = 0x80 | (bytes[8] & 0x3f)
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`
}

/** Thrown for an edit or deletion that the chat rules would refuse. */
export class ChatError extends Error {}

/**
 * One chat room over a `Y.Doc`, acting for one user on one device.
 */
export class ChatRoom {
  /**
   * @param {Y.Doc} doc the room's document (synced by any provider)
   * @param {{ user: string, device: string, now?: () => number }} who the user id (the token's
   *   subject on a server with a secret) and this device's id (no `/`)
   */
  constructor(doc, { user, device, now = () => Date.now() }) {
    if (device.includes('/')) throw new ChatError('device ids must not contain "/"')
    if (user.includes('\n')) throw new ChatError('user ids must not contain a line break')
    this.doc = doc
    this.user = user
    this.device = device
    this.now = now
    /** @type {Y.Map<Y.Map<any>>} */
    this.messagesMap = doc.getMap(MESSAGES_ROOT)
    /** @type {Y.Map<any>} */
    this.receiptsMap = doc.getMap(RECEIPTS_ROOT)
    /** @type {Y.Map<any>} */
    this.deliveredMap = doc.getMap(DELIVERED_ROOT)
    /** @type {Y.Map<any>} */
    this.reactionsMap = doc.getMap(REACTIONS_ROOT)
    /** @type {Y.Map<any>} */
    this.membersMap = doc.getMap(MEMBERS_ROOT)
    this.clock = new HlcClock()
    for (const fields of this.messagesMap.values()) this.#observeStamp(fields)
    /** @param {Y.YMapEvent<Y.Map<any>>} event */
    this.onMessages = (event) => {
      for (const [key, change] of event.changes.keys) {
        if (change.action === 'add') this.#observeStamp(this.messagesMap.get(key))
      }
    }
    this.messagesMap.observe(this.onMessages)
  }

  /** @param {unknown} fields */
  #observeStamp(fields) {
    if (fields instanceof Y.Map) {
      const hlc = parseHlc(fields.get('hlc'))
      if (hlc) this.clock.observe(hlc)
    }
  }

  /** Stops following the document. */
  destroy() {
    this.messagesMap.unobserve(this.onMessages)
  }

  /**
   * Sends a message: a new `Y.Map` with every field, in one transaction.
   * @param {string} text
   * @param {Details} [details] kind, metadata, attachments, the message it answers
   * @returns {string} the new message's id
   */
  send(text, details = {}) {
    const { kind = 'text', meta, attachments, replyTo } = details
    if (!KINDS.includes(kind)) throw new ChatError(`a client sends ${KINDS.join(', ')} messages, not ${kind}`)
    if (attachments && attachments.length > 16) throw new ChatError('at most 16 attachments')
    for (const a of attachments ?? []) checkAttachment(a)
    if (meta) checkMeta(meta)
    if (replyTo !== undefined && (typeof replyTo !== 'string' || !replyTo || replyTo.includes('/'))) {
      throw new ChatError('replyTo must be a message id')
    }
    const now = this.now()
    const hlc = this.clock.tick(now)
    const id = uuidv7(now)
    const client = this.doc.clientID
    this.doc.transact(() => {
      const fields = new Y.Map()
      this.messagesMap.set(id, fields)
      fields.set('id', id)
      fields.set('author', this.user)
      fields.set('device', this.device)
      fields.set('client', client)
      fields.set('text', text)
      fields.set('created', now)
      fields.set('hlc', hlcKey(hlc))
      fields.set('sort', sortKey(hlc, client, id))
      if (kind !== 'text') fields.set('kind', kind)
      if (meta && Object.keys(meta).length) fields.set('meta', { ...meta })
      if (attachments?.length) fields.set('attachments', attachments.map(cleanAttachment))
      if (replyTo !== undefined) fields.set('reply_to', replyTo)
    })
    return id
  }

  /**
   * Adds (or with `add = false` takes back) this user's reaction to a message.
   * @param {string} id
   * @param {string} reaction an emoji: no `/`, no spaces, at most 64 bytes
   * @param {boolean} [add]
   * @returns {boolean} whether anything changed
   */
  react(id, reaction, add = true) {
    if (!reaction || reaction.includes('/') || /\s/.test(reaction) || new TextEncoder().encode(reaction).length > 64) {
      throw new ChatError(`not a reaction: ${JSON.stringify(reaction)}`)
    }
    if (!this.message(id)) throw new ChatError(`no message ${id}`)
    const key = `${id}/${reaction}/${this.user}`
    if (this.reactionsMap.has(key) === add) return false
    if (add) this.reactionsMap.set(key, { at: this.now() })
    else this.reactionsMap.delete(key)
    return true
  }

  /**
   * Every message's reactions: message id → reaction → users (in name order).
   * @returns {Map<string, Map<string, string[]>>}
   */
  reactions() {
    /** @type {Map<string, Map<string, string[]>>} */
    const out = new Map()
    for (const key of this.reactionsMap.keys()) {
      const first = key.indexOf('/')
      const second = key.indexOf('/', first + 1)
      if (first <= 0 || second <= first + 1 || second === key.length - 1) continue
      const [message, reaction, user] = [key.slice(0, first), key.slice(first + 1, second), key.slice(second + 1)]
      const byReaction = out.get(message) ?? new Map()
      out.set(message, byReaction)
      byReaction.set(reaction, [...(byReaction.get(reaction) ?? []), user].sort())
    }
    return out
  }

  /**
   * Records that this device has every message up to and including `id` (a delivery
   * receipt). Never moves back: `false` when the user's delivery receipt is there already.
   * @param {string} id
   * @returns {boolean} whether the receipt moved
   */
  markDelivered(id) {
    return this.#raise(this.deliveredMap, id)
  }

  /**
   * Records delivery of everything others wrote that this device holds: call it when messages
   * arrive (the page does, on every remote change).
   * @returns {boolean} whether the receipt moved
   */
  markAllDelivered() {
    const latest = this.messages().filter((m) => m.author !== this.user).at(-1)
    return latest ? this.markDelivered(latest.id) : false
  }

  /**
   * Every user's delivery receipt: the greatest `sort` among their devices.
   * @returns {Map<string, Receipt>}
   */
  delivered() {
    return readReceipts(this.deliveredMap)
  }

  /**
   * The users other than its author who have a message on a device, or read it.
   * @param {Message} message
   * @returns {string[]}
   */
  deliveredTo(message) {
    const users = new Set([...this.delivered().values()].filter((r) => r.sort >= message.sort).map((r) => r.user))
    for (const reader of this.readBy(message.sort)) users.add(reader)
    users.delete(message.author)
    return [...users].sort()
  }

  /**
   * Replaces the text of one of this user's messages.
   * @param {string} id
   * @param {string} text
   */
  edit(id, text) {
    const fields = this.#own(id)
    this.doc.transact(() => {
      fields.set('text', text)
      fields.set('edited', this.now())
    })
  }

  /**
   * Deletes one of this user's messages (a tombstone: the entry stays, its text goes).
   * @param {string} id
   */
  delete(id) {
    const fields = this.#own(id)
    this.doc.transact(() => {
      fields.set('text', '')
      fields.set('deleted', true)
      fields.set('edited', this.now())
    })
  }

  /** @param {string} id @returns {Y.Map<any>} */
  #own(id) {
    const fields = this.messagesMap.get(id)
    if (!(fields instanceof Y.Map)) throw new ChatError(`no message ${id}`)
    if (fields.get('author') !== this.user) throw new ChatError(`message ${id} is not ${this.user}'s`)
    return fields
  }

  /**
   * One message, or `null`.
   * @param {string} id
   * @returns {Message | null}
   */
  message(id) {
    const fields = this.messagesMap.get(id)
    return fields instanceof Y.Map ? readMessage(id, fields) : null
  }

  /**
   * Every message, in display order.
   * @returns {Message[]}
   */
  messages() {
    /** @type {Message[]} */
    const all = []
    for (const [id, fields] of this.messagesMap.entries()) {
      if (!(fields instanceof Y.Map)) continue
      const message = readMessage(id, fields)
      if (message) all.push(message)
    }
    return all.sort((a, b) => (a.sort < b.sort ? -1 : a.sort > b.sort ? 1 : 0))
  }

  /**
   * Marks everything up to and including message `id` read by this device. A receipt never
   * moves back: returns `false` (and writes nothing) when the user's receipt is there already.
   * @param {string} id
   * @returns {boolean} whether the receipt moved
   */
  markRead(id) {
    return this.#raise(this.receiptsMap, id)
  }

  /**
   * Raises this device's entry in a receipts map to message `id`.
   * @param {Y.Map<any>} map
   * @param {string} id
   */
  #raise(map, id) {
    const message = this.message(id)
    if (!message) throw new ChatError(`no message ${id}`)
    const current = readReceipts(map).get(this.user)
    if (current && current.sort >= message.sort) return false
    map.set(`${this.user}/${this.device}`, { message: id, sort: message.sort, at: this.now() })
    return true
  }

  /**
   * Every user's receipt: the greatest `sort` among their devices.
   * @returns {Map<string, Receipt>}
   */
  receipts() {
    return readReceipts(this.receiptsMap)
  }

  /**
   * @param {string} user
   * @returns {Receipt | null}
   */
  receipt(user) {
    return this.receipts().get(user) ?? null
  }

  /**
   * Messages after the user's receipt that others wrote and did not delete.
   * @param {string} [user]
   * @returns {number}
   */
  unreadCount(user = this.user) {
    const read = this.receipt(user)?.sort
    return this.messages()
      .filter((m) => !m.deleted && m.kind !== 'system' && m.author !== user && (read === undefined || m.sort > read))
      .length
  }

  /**
   * Joins the room: this user's entry in `members` becomes `joined` (the server then writes a
   * system message). Works offline like every write.
   * @returns {boolean} whether anything changed (false: a member already)
   */
  join() {
    return this.#membership(true)
  }

  /**
   * Leaves the room.
   * @returns {boolean} whether anything changed (false: not a member)
   */
  leave() {
    return this.#membership(false)
  }

  /** @param {boolean} joined */
  #membership(joined) {
    if (this.isMember(this.user) === joined) return false
    this.membersMap.set(this.user, { state: joined ? 'joined' : 'left', at: this.now() })
    return true
  }

  /**
   * Whether `user` has joined (and not left).
   * @param {string} user
   */
  isMember(user) {
    return this.members().some((m) => m.user === user && m.joined)
  }

  /**
   * Everyone who joined, with their state and when, in user order.
   * @returns {{ user: string, joined: boolean, at: number }[]}
   */
  members() {
    /** @type {{ user: string, joined: boolean, at: number }[]} */
    const out = []
    for (const [user, value] of this.membersMap.entries()) {
      if (!isPlainObject(value)) continue
      const v = /** @type {Record<string, unknown>} */ (value)
      if ((v.state !== 'joined' && v.state !== 'left') || typeof v.at !== 'number') continue
      out.push({ user, joined: v.state === 'joined', at: v.at })
    }
    return out.sort((a, b) => (a.user < b.user ? -1 : a.user > b.user ? 1 : 0))
  }

  /**
   * The users whose receipt covers a message's `sort`, in name order.
   * @param {string} sort
   * @returns {string[]}
   */
  readBy(sort) {
    return [...this.receipts().values()]
      .filter((r) => r.sort >= sort)
      .map((r) => r.user)
      .sort()
  }

  /**
   * Calls `listener` after every change to the messages or receipts, local or remote.
   * @param {() => void} listener
   * @returns {() => void} stops it
   */
  onChange(listener) {
    const handler = () => listener()
    const flat = [this.receiptsMap, this.deliveredMap, this.reactionsMap, this.membersMap]
    this.messagesMap.observeDeep(handler)
    for (const map of flat) map.observe(handler)
    return () => {
      this.messagesMap.unobserveDeep(handler)
      for (const map of flat) map.unobserve(handler)
    }
  }
}

/**
 * The latest entry per user of a receipts map (`receipts` or `delivered`).
 * @param {Y.Map<any>} map
 * @returns {Map<string, Receipt>}
 */
function readReceipts(map) {
  /** @type {Map<string, Receipt>} */
  const out = new Map()
  for (const [key, value] of map.entries()) {
    const slash = key.lastIndexOf('/')
    if (slash < 0 || !value || typeof value !== 'object') continue
    if (typeof value.message !== 'string' || typeof value.sort !== 'string') continue
    const user = key.slice(0, slash)
    const device = key.slice(slash + 1)
    const at = typeof value.at === 'number' ? value.at : 0
    const existing = out.get(user)
    const better = !existing || value.sort > existing.sort || (value.sort === existing.sort && device > existing.device)
    if (better) out.set(user, { user, device, message: value.message, sort: value.sort, at })
  }
  return out
}

/** @param {Record<string, string>} meta */
function checkMeta(meta) {
  const entries = Object.entries(meta)
  if (entries.length > 32) throw new ChatError('at most 32 metadata entries')
  for (const [key, value] of entries) {
    if (!key || key.length > 128 || typeof value !== 'string' || value.length > 4096) {
      throw new ChatError(`bad metadata entry ${JSON.stringify(key)}`)
    }
  }
}

/** @param {Attachment} a */
function checkAttachment(a) {
  const ok =
    typeof a.url === 'string' && a.url.length > 0 && a.url.length <= 4096 &&
    typeof a.mime === 'string' && /^[!-.0-~]+\/[!-.0-~]+/.test(a.mime) && a.mime.length <= 255 &&
    Number.isSafeInteger(a.size) && a.size >= 0 &&
    (a.sha256 === undefined || /^[0-9a-f]{64}$/.test(a.sha256)) &&
    (a.width === undefined || (Number.isSafeInteger(a.width) && a.width >= 0)) &&
    (a.height === undefined || (Number.isSafeInteger(a.height) && a.height >= 0))
  if (!ok) throw new ChatError(`bad attachment ${JSON.stringify(a)}`)
}

/** Only the schema's fields. @param {Attachment} a */
function cleanAttachment(a) {
  /** @type {Attachment} */
  const out = { url: a.url, mime: a.mime, size: a.size }
  if (a.sha256 !== undefined) out.sha256 = a.sha256
  if (a.width !== undefined) out.width = a.width
  if (a.height !== undefined) out.height = a.height
  return out
}

/**
 * @param {string} id
 * @param {Y.Map<any>} fields
 * @returns {Message | null}
 */
function readMessage(id, fields) {
  const hlc = fields.get('hlc')
  const sort = fields.get('sort')
  const author = fields.get('author')
  if (!parseHlc(hlc) || typeof sort !== 'string' || typeof author !== 'string') return null
  const number = (/** @type {string} */ key) => {
    const v = fields.get(key)
    return typeof v === 'number' && Number.isFinite(v) ? v : undefined
  }
  const text = fields.get('text')
  const device = fields.get('device')
  return {
    id,
    author,
    device: typeof device === 'string' ? device : '',
    client: number('client') ?? 0,
    text: typeof text === 'string' ? text : '',
    created: number('created') ?? 0,
    hlc,
    sort,
    edited: number('edited'),
    deleted: fields.get('deleted') === true,
    kind: typeof fields.get('kind') === 'string' ? fields.get('kind') : 'text',
    meta: isPlainObject(fields.get('meta')) ? fields.get('meta') : {},
    attachments: Array.isArray(fields.get('attachments')) ? fields.get('attachments') : [],
    replyTo: typeof fields.get('reply_to') === 'string' ? fields.get('reply_to') : undefined,
    map: fields,
  }
}

/** @param {unknown} v @returns {v is Record<string, any>} */
function isPlainObject(v) {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Y.AbstractType)
}
