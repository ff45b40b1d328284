// @ts-check
/**
 * What the server has durably stored, per document: the page shows a message as "sending" until
 * the server has it, then "saved".
 *
 * driftsync's `/hocuspocus` endpoint answers every SyncStep2 or Update of a document with one
 * `SyncStatus`, **after** the durable commit, in the order they came. The provider only counts
 * them (`unsyncedChanges`), and that count is reset on every reconnect, so it cannot say *which*
 * change is stored. This module watches the provider's socket instead (it is passed as the
 * provider's `WebSocketPolyfill`): for each write sent it remembers the write's state vector (the
 * end clock per client), and when the matching `SyncStatus(1)` comes it adds that to the
 * document's *stored* state vector. The server's own SyncStep1 (its state vector, sent when a
 * document is opened) and the updates it sends (others' changes it holds) count as stored too.
 * A change `(client, clock)` is stored once `stored[client] > clock`. The stored vector is kept in
 * `localStorage`, so that a page reloaded while offline still knows what was saved.
 */

import * as Y from 'yjs'
import * as decoding from 'lib0/decoding'

// The Hocuspocus message types (`@hocuspocus/common`) and y-protocols' sync steps.
const SYNC = 0
const SYNC_STATUS = 8
const STEP1 = 0
const STEP2 = 1
const UPDATE = 2

/** The stored state vector of one document. */
export class StoredVector {
  /**
   * @param {string} name the document id
   * @param {Storage | null} [storage] where the vector is kept across reloads
   */
  constructor(name, storage = globalThis.localStorage ?? null) {
    this.name = name
    this.storage = storage
    /** @type {Map<number, number>} client → first clock the server does not have */
    this.vector = new Map()
    /** @type {Set<() => void>} */
    this.listeners = new Set()
    try {
      const kept = JSON.parse(storage?.getItem(this.#key()) ?? '{}')
      for (const [client, clock] of Object.entries(kept)) {
        if (Number.isInteger(clock)) this.vector.set(Number(client), /** @type {number} */ (clock))
      }
    } catch {
      // A broken entry only means we know less: the next sync tells us again.
    }
  }

  #key() {
    return `driftsync:stored:${this.name}`
  }

  /**
   * Whether the server has the change `(client, clock)`.
   * @param {{ client: number, clock: number }} id
   */
  has(id) {
    return (this.vector.get(id.client) ?? 0) > id.clock
  }

  /**
   * Whether the server has everything `doc` holds.
   * @param {Y.Doc} doc
   */
  covers(doc) {
    for (const [client, clock] of Y.decodeStateVector(Y.encodeStateVector(doc))) {
      if ((this.vector.get(client) ?? 0) < clock) return false
    }
    return true
  }

  /**
   * Adds what the server is known to hold.
   * @param {Map<number, number>} vector
   */
  merge(vector) {
    let changed = false
    for (const [client, clock] of vector) {
      if ((this.vector.get(client) ?? 0) < clock) {
        this.vector.set(client, clock)
        changed = true
      }
    }
    if (!changed) return
    try {
      this.storage?.setItem(this.#key(), JSON.stringify(Object.fromEntries(this.vector)))
    } catch {
      // Storage full or refused: the vector still works for this page.
    }
    for (const listener of this.listeners) listener()
  }

  /**
   * Calls `listener` whenever the server is known to hold more.
   * @param {() => void} listener
   * @returns {() => void} stops it
   */
  onChange(listener) {
    this.listeners.add(listener)
    return () => this.listeners.delete(listener)
  }
}

/** @type {Map<string, StoredVector>} */
const vectors = new Map()

/**
 * The stored vector of document `name` (one per page).
 * @param {string} name
 * @returns {StoredVector}
 */
export function storedVector(name) {
  let vector = vectors.get(name)
  if (!vector) {
    vector = new StoredVector(name)
    vectors.set(name, vector)
  }
  return vector
}

/**
 * The end clock per client of the structs an update carries. (Not `encodeStateVectorFromUpdate`:
 * that counts only clients whose structs start at clock 0, as if applied to an empty document.)
 * The server stores an update only once everything it builds on is stored, so once it holds
 * an update it holds each of its clients' changes below these clocks.
 * @param {Uint8Array} update
 */
function vectorOf(update) {
  return Y.parseUpdateMeta(update).to
}

/**
 * Reads a Hocuspocus frame: its document (the address up to a `\0`, which separates a
 * provider's session id) and the sync message it carries, if any.
 * @param {Uint8Array} bytes
 * @returns {{ doc: string, type: number, sync?: number, payload?: Uint8Array, status?: number } | null}
 */
export function readFrame(bytes) {
  try {
    const decoder = decoding.createDecoder(bytes)
    const doc = decoding.readVarString(decoder).split('\0')[0]
    const type = decoding.readVarUint(decoder)
    if (type === SYNC) {
      const sync = decoding.readVarUint(decoder)
      return { doc, type, sync, payload: decoding.readVarUint8Array(decoder) }
    }
    if (type === SYNC_STATUS) return { doc, type, status: decoding.readVarInt(decoder) }
    return { doc, type }
  } catch {
    return null
  }
}

/** @param {unknown} data */
function asBytes(data) {
  if (data instanceof Uint8Array) return data
  if (data instanceof ArrayBuffer) return new Uint8Array(data)
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  return null
}

/**
 * A `WebSocket` that watches the Hocuspocus frames it carries and keeps each document's
 * {@link storedVector} up to date. Pass it as `WebSocketPolyfill` to
 * `HocuspocusProviderWebsocket`. Every socket starts with nothing in flight: writes a closed
 * socket left unanswered are sent again by the next sync, and counted then.
 */
export class TrackingWebSocket extends WebSocket {
  /** @param {string | URL} url @param {string | string[]} [protocols] */
  constructor(url, protocols) {
    super(url, protocols)
    /** @type {Map<string, Map<number, number>[]>} per document, the writes awaiting SyncStatus */
    this.inFlight = new Map()
    this.addEventListener('message', (event) => {
      const bytes = asBytes(event.data)
      const frame = bytes && readFrame(bytes)
      if (!frame) return
      if (frame.type === SYNC && frame.payload) {
        try {
          if (frame.sync === STEP1) storedVector(frame.doc).merge(Y.decodeStateVector(frame.payload))
          else storedVector(frame.doc).merge(vectorOf(frame.payload))
        } catch {
          // Not ours to judge: the provider reports malformed messages.
        }
      } else if (frame.type === SYNC_STATUS) {
        const write = this.inFlight.get(frame.doc)?.shift()
        if (write && frame.status === 1) storedVector(frame.doc).merge(write)
      }
    })
  }

  /** @param {string | ArrayBufferLike | Blob | ArrayBufferView} data */
  send(data) {
    const bytes = asBytes(data)
    const frame = bytes && readFrame(bytes)
    if (frame && frame.type === SYNC && (frame.sync === STEP2 || frame.sync === UPDATE) && frame.payload) {
      let write
      try {
        write = vectorOf(frame.payload)
      } catch {
        write = new Map()
      }
      const queue = this.inFlight.get(frame.doc) ?? []
      queue.push(write)
      this.inFlight.set(frame.doc, queue)
    }
    super.send(data)
  }
}
