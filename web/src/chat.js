// @ts-check
/**
 * driftsync's chat schema over plain Yjs: the same rooms the Rust client (`engine::chat`)
 * reads and writes, and that the server checks under its chat rules (ARCHITECTURE.md, "Chat
 * and receipts schema"). Nothing here talks to a server: give it a `Y.Doc` that any provider
 * syncs (the page uses `@hocuspocus/provider` against driftsync's `/hocuspocus`).
 *
 * A room document has two root maps:
 * - `messages`: message id (UUIDv7) → a nested `Y.Map` with `id`, `author`, `device`, `client`,
 *   `text`, `created`, `hlc`, `sort` and, once edited or deleted, `edited` and `deleted`;
 * - `receipts`: `"{user}/{device}"` → `{ message, sort, at }`, "read up to and including".
 *
 * Display order is ascending `sort` (`{hlc}/{client:016}/{id}`) compared as strings, which every
 * replica computes alike: the same messages in the same order everywhere.
 */

import * as Y from 'yjs'

export const MESSAGES_ROOT = 'messages'
export const RECEIPTS_ROOT = 'receipts'

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
 * @property {Y.Map<any>} map the message's `Y.Map` (its `_item.id` says which replica wrote it)
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
   * @returns {string} the new message's id
   */
  send(text) {
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
    })
    return id
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
    const message = this.message(id)
    if (!message) throw new ChatError(`no message ${id}`)
    const current = this.receipt(this.user)
    if (current && current.sort >= message.sort) return false
    this.receiptsMap.set(`${this.user}/${this.device}`, { message: id, sort: message.sort, at: this.now() })
    return true
  }

  /**
   * Every user's receipt: the greatest `sort` among their devices.
   * @returns {Map<string, Receipt>}
   */
  receipts() {
    /** @type {Map<string, Receipt>} */
    const out = new Map()
    for (const [key, value] of this.receiptsMap.entries()) {
      const slash = key.lastIndexOf('/')
      if (slash < 0 || !value || typeof value !== 'object') continue
      if (typeof value.message !== 'string' || typeof value.sort !== 'string') continue
      const user = key.slice(0, slash)
      const device = key.slice(slash + 1)
      const at = typeof value.at === 'number' ? value.at : 0
      const existing = out.get(user)
      const better =
        !existing || value.sort > existing.sort || (value.sort === existing.sort && device > existing.device)
      if (better) out.set(user, { user, device, message: value.message, sort: value.sort, at })
    }
    return out
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
    return this.messages().filter((m) => !m.deleted && m.author !== user && (read === undefined || m.sort > read))
      .length
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
    this.messagesMap.observeDeep(handler)
    this.receiptsMap.observe(handler)
    return () => {
      this.messagesMap.unobserveDeep(handler)
      this.receiptsMap.unobserve(handler)
    }
  }
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
    map: fields,
  }
}
