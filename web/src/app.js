// @ts-check
/**
 * The page driftsync serves at `/`: a collaborative text editor and a chat room, offline-first.
 *
 * How it uses driftsync from JavaScript, which is all stock Yjs:
 * - two `Y.Doc`s: the document `doc` (its `Y.Text` "text", the one native clients and the CLI
 *   edit) and the chat room `chat/{room}` (read and written only through `./chat.js`);
 * - each kept in IndexedDB by `y-indexeddb`: written there first, so nothing typed is lost when
 *   the page is closed or reloaded offline;
 * - both synced over one WebSocket to `/hocuspocus` by `@hocuspocus/provider`, whose socket is
 *   watched by `./acks.js` to tell which changes the server has stored (it answers each write
 *   after its durable commit);
 * - presence and typing in the Yjs awareness of the room (the server mirrors native clients'
 *   presence and typing into it, and the page's into theirs).
 */

import * as Y from 'yjs'
import { HocuspocusProvider, HocuspocusProviderWebsocket } from '@hocuspocus/provider'
import { IndexeddbPersistence } from 'y-indexeddb'
import { yCollab } from 'y-codemirror.next'
import { EditorView, keymap, drawSelection, highlightActiveLine, placeholder } from '@codemirror/view'
import { defaultKeymap } from '@codemirror/commands'

import { ChatRoom } from './chat.js'
import { TrackingWebSocket, storedVector } from './acks.js'

const TYPING_IDLE_MS = 3000

// ----- address and identity -----

const params = new URLSearchParams(location.search)
const token = params.get('token') || null

/** A short random id for a fresh document and room. */
function freshId() {
  const bytes = crypto.getRandomValues(new Uint8Array(5))
  return Array.from(bytes, (b) => 'abcdefghijkmnopqrstuvwxyz23456789'[b % 33]).join('')
}

const ADJECTIVES = ['Brave', 'Calm', 'Clever', 'Eager', 'Gentle', 'Happy', 'Jolly', 'Kind', 'Lucky', 'Merry',
  'Nimble', 'Proud', 'Quick', 'Quiet', 'Sunny', 'Swift', 'Witty', 'Zesty']
const ANIMALS = ['Otter', 'Falcon', 'Panda', 'Fox', 'Heron', 'Koala', 'Lynx', 'Marten', 'Owl', 'Puffin',
  'Robin', 'Seal', 'Tiger', 'Wombat', 'Yak', 'Zebra', 'Badger', 'Crane']

function friendlyName() {
  const [a, b] = crypto.getRandomValues(new Uint16Array(2))
  return `${ADJECTIVES[a % ADJECTIVES.length]} ${ANIMALS[b % ANIMALS.length]}`
}

/**
 * The token's subject: with a secret, the server knows the user by it alone.
 * @param {string} jwt
 * @returns {string | null}
 */
function tokenSubject(jwt) {
  try {
    const payload = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    const sub = JSON.parse(atob(payload)).sub
    return typeof sub === 'string' ? sub : null
  } catch {
    return null
  }
}

/** @param {string} key @param {() => string} make */
function remembered(key, make) {
  let value = localStorage.getItem(key)
  if (!value) {
    value = make()
    localStorage.setItem(key, value)
  }
  return value
}

const shared = params.get('room') || params.get('doc')?.replace(/^.*\//, '') || freshId()
const docId = params.get('doc') || `notes/${shared}`
const roomName = params.get('room') || shared
const roomId = `chat/${roomName}`
const user = (token && tokenSubject(token)) || params.get('user') || remembered('driftsync:user', friendlyName)
const device = remembered('driftsync:device', () => `web-${freshId()}`)

// A shareable link: the document and the room, never the user or the token.
const link = new URL(location.href)
link.search = new URLSearchParams({ doc: docId, room: roomName }).toString()
const address = new URLSearchParams({ doc: docId, room: roomName })
if (params.get('user')) address.set('user', user)
if (token) address.set('token', token)
history.replaceState(null, '', `${location.pathname}?${address}`)

/** A stable colour per user. @param {string} name */
function colourOf(name) {
  let hash = 0
  for (const ch of name) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0
  const hue = hash % 360
  return { color: `hsl(${hue} 70% 45%)`, colorLight: `hsl(${hue} 70% 45% / 0.25)` }
}

/** @template {HTMLElement} T @param {string} id @returns {T} */
function element(id) {
  const found = document.getElementById(id)
  if (!found) throw new Error(`the page has no #${id}`)
  return /** @type {T} */ (found)
}

// ----- the server: is a token needed? -----

async function needsToken() {
  try {
    const info = await (await fetch('/v1/info', { cache: 'no-store' })).json()
    return info.auth === true
  } catch {
    return false
  }
}

function askForToken() {
  const dialog = /** @type {HTMLDialogElement} */ (element('token-dialog'))
  const form = /** @type {HTMLFormElement} */ (element('token-form'))
  form.addEventListener('submit', (event) => {
    event.preventDefault()
    const value = /** @type {HTMLInputElement} */ (element('token-input')).value.trim()
    if (!value) return
    const next = new URLSearchParams({ doc: docId, room: roomName, token: value })
    location.search = `?${next}`
  })
  dialog.showModal()
}

// ----- start -----

async function main() {
  element('doc-name').textContent = docId
  element('room-name').textContent = roomName
  element('me').textContent = user
  element('me').style.setProperty('--user-colour', colourOf(user).color)
  element('share').addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(link.href)
      element('share').textContent = 'Link copied'
    } catch {
      prompt('Share this link', link.href)
    }
    setTimeout(() => (element('share').textContent = 'Copy link'), 2000)
  })

  if (!token && (await needsToken())) {
    askForToken()
    return
  }

  const textDoc = new Y.Doc()
  const chatDoc = new Y.Doc()
  // Local first: both documents are read from and written to IndexedDB before any network.
  const stores = [new IndexeddbPersistence(`driftsync:${docId}`, textDoc), new IndexeddbPersistence(`driftsync:${roomId}`, chatDoc)]
  await Promise.all(stores.map((s) => s.whenSynced))

  const offlineSwitch = /** @type {HTMLInputElement} */ (element('offline'))
  offlineSwitch.checked = sessionStorage.getItem('driftsync:offline') === '1'

  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/hocuspocus`
  const socket = new HocuspocusProviderWebsocket({
    url,
    WebSocketPolyfill: TrackingWebSocket,
    autoConnect: !offlineSwitch.checked,
  })
  const open = (/** @type {string} */ name, /** @type {Y.Doc} */ document) => {
    const provider = new HocuspocusProvider({ websocketProvider: socket, name, document, token: token ?? '' })
    provider.attach()
    provider.on('authenticationFailed', ({ reason }) => showProblem(`The server refused ${name}: ${reason}`))
    return provider
  }
  const textProvider = open(docId, textDoc)
  const chatProvider = open(roomId, chatDoc)
  const me = { name: user, ...colourOf(user) }
  textProvider.awareness?.setLocalStateField('user', me)
  chatProvider.awareness?.setLocalStateField('user', me)

  offlineSwitch.addEventListener('change', () => {
    sessionStorage.setItem('driftsync:offline', offlineSwitch.checked ? '1' : '0')
    if (offlineSwitch.checked) {
      socket.disconnect()
    } else {
      // The provider queued every change made offline as an update of its own; the sync that
      // opens each document sends all of them at once (what the server lacks), so the queue
      // would only resend them, and an update queued after a reload can build on changes that
      // only that sync brings (the server refuses it and asks for a resync).
      socket.messageQueue = []
      socket.connect()
    }
    showConnection()
  })

  /** @type {string} */
  let connection = 'disconnected'
  socket.on('status', (/** @type {{ status: string }} */ { status }) => {
    connection = status
    showConnection()
  })
  function showConnection() {
    const state = offlineSwitch.checked ? 'offline' : connection === 'connected' ? 'online' : 'connecting'
    const badge = element('connection')
    badge.dataset.state = state
    badge.textContent = { offline: 'Offline', online: 'Online', connecting: 'Connecting…' }[state] ?? state
    showSaved()
  }

  // ----- the editor -----

  const ytext = textDoc.getText('text')
  const textStored = storedVector(docId)
  new EditorView({
    parent: element('editor'),
    doc: ytext.toString(),
    extensions: [
      keymap.of(defaultKeymap),
      drawSelection(),
      highlightActiveLine(),
      EditorView.lineWrapping,
      placeholder('Start typing: everyone on this document sees it as you type…'),
      EditorView.contentAttributes.of({ 'aria-label': 'Document text' }),
      yCollab(ytext, textProvider.awareness),
    ],
  })
  // For the browser console and the browser tests.
  Object.assign(window, { driftsyncDebug: { text: () => ytext.toString(), textDoc, chatDoc } })

  function showSaved() {
    const saved = element('saved')
    if (textStored.covers(textDoc)) {
      saved.textContent = 'All changes saved'
      saved.dataset.state = 'saved'
    } else {
      saved.textContent = offlineSwitch.checked ? 'Offline: changes kept on this device' : 'Saving…'
      saved.dataset.state = 'pending'
    }
  }
  textDoc.on('update', showSaved)
  textStored.onChange(showSaved)

  // ----- the chat -----

  const room = new ChatRoom(chatDoc, { user, device })
  // Opening a room joins it (offline too: the server announces it once it arrives), so that
  // the room is in the user's inbox and its members are notified.
  room.join()
  const chatStored = storedVector(roomId)
  const list = element('messages')
  /** @type {Map<string, HTMLLIElement>} */
  const items = new Map()
  /** @type {Set<string>} ids of messages in view */
  const inView = new Set()
  const visibility = new IntersectionObserver(
    (entries) => {
      for (const entry of entries) {
        const id = /** @type {HTMLElement} */ (entry.target).dataset.id ?? ''
        if (entry.isIntersecting) inView.add(id)
        else inView.delete(id)
      }
      markRead()
    },
    { root: list, threshold: 0.6 },
  )

  /** Raises this device's receipt to the last message in view. */
  function markRead() {
    if (document.visibilityState !== 'visible') return
    let last = null
    for (const id of inView) {
      const message = room.message(id)
      if (message && (!last || message.sort > last.sort)) last = message
    }
    if (last) room.markRead(last.id)
  }
  document.addEventListener('visibilitychange', markRead)

  /** @param {number} ms */
  const time = (ms) => new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })

  function renderMessages() {
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40
    const messages = room.messages()
    const allReactions = room.reactions()
    for (const message of messages) {
      let item = items.get(message.id)
      if (!item) {
        item = document.createElement('li')
        item.dataset.id = message.id
        item.innerHTML =
          '<div class="meta"><span class="author"></span><time></time></div><p class="reply" hidden></p>' +
          '<p class="text"></p><ul class="files"></ul><div class="reactions"></div><div class="status"></div>' +
          '<div class="actions"><button type="button" class="answer">Reply</button>' +
          '<button type="button" class="like" title="React with 👍">👍</button></div>'
        const id = message.id
        item.querySelector('.answer')?.addEventListener('click', () => replyTo(id))
        item.querySelector('.like')?.addEventListener('click', () => toggle(id, '👍'))
        items.set(message.id, item)
        visibility.observe(item)
      }
      // Joins and leaves, written by the server: a line of their own, without actions.
      const system = message.kind === 'system'
      const mine = !system && message.author === user
      item.classList.toggle('system', system)
      item.classList.toggle('mine', mine)
      item.classList.toggle('deleted', message.deleted)
      const author = /** @type {HTMLElement} */ (item.querySelector('.author'))
      author.textContent = message.author
      author.style.color = colourOf(message.author).color
      const when = /** @type {HTMLElement} */ (item.querySelector('time'))
      when.textContent = time(message.created)
      const body = /** @type {HTMLElement} */ (item.querySelector('.text'))
      body.textContent = message.deleted ? 'message deleted' : message.text + (message.edited ? ' (edited)' : '')
      const answered = message.replyTo ? room.message(message.replyTo) : null
      const reply = /** @type {HTMLElement} */ (item.querySelector('.reply'))
      reply.hidden = !message.replyTo
      reply.textContent = answered ? `↪ ${answered.author}: ${answered.text.slice(0, 80)}` : message.replyTo ? '↪ a message' : ''
      // Attachments are links: the page loads nothing from other sites (its CSP).
      const files = /** @type {HTMLElement} */ (item.querySelector('.files'))
      files.replaceChildren(
        ...(message.deleted ? [] : message.attachments).map((a) => {
          const li = document.createElement('li')
          const link = document.createElement('a')
          link.href = /^https?:\/\//.test(a.url) ? a.url : '#'
          link.rel = 'noopener noreferrer'
          link.target = '_blank'
          link.textContent = `📎 ${a.url.split('/').pop() || a.url} (${a.mime}, ${a.size} B)`
          li.append(link)
          return li
        }),
      )
      const reactions = /** @type {HTMLElement} */ (item.querySelector('.reactions'))
      reactions.replaceChildren(
        ...[...(allReactions.get(message.id) ?? new Map())].map(([reaction, users]) => {
          const chip = document.createElement('button')
          chip.type = 'button'
          chip.className = users.includes(user) ? 'chip own' : 'chip'
          chip.textContent = `${reaction} ${users.length}`
          chip.title = users.join(', ')
          chip.addEventListener('click', () => toggle(message.id, reaction))
          return chip
        }),
      )
      const status = /** @type {HTMLElement} */ (item.querySelector('.status'))
      if (mine) {
        const item_ = /** @type {any} */ (message.map)._item
        const saved = item_ ? chatStored.has(item_.id) : false
        const readers = room.readBy(message.sort).filter((u) => u !== user)
        const holders = room.deliveredTo(message)
        const state = readers.length ? 'read' : holders.length ? 'delivered' : saved ? 'saved' : 'sending'
        status.dataset.state = state
        status.textContent = {
          read: `✓✓ Read by ${readers.join(', ')}`,
          delivered: `✓✓ Delivered to ${holders.join(', ')}`,
          saved: '✓ Saved',
          sending: 'Sending…',
        }[state]
        if (!message.deleted && !item.querySelector('.delete')) {
          const remove = document.createElement('button')
          remove.className = 'delete'
          remove.type = 'button'
          remove.textContent = 'Delete'
          remove.addEventListener('click', () => room.delete(message.id))
          item.append(remove)
        } else if (message.deleted) {
          item.querySelector('.delete')?.remove()
        }
      } else {
        status.textContent = ''
      }
      list.append(item) // in order: appending an existing node moves it
    }
    if (nearBottom) list.scrollTop = list.scrollHeight
    const unread = room.unreadCount()
    element('unread').textContent = unread ? `${unread} unread` : ''
    markRead()
    // Every message of others this device holds is delivered (after the change that brought
    // it: not inside the observer that reports it).
    queueMicrotask(() => room.markAllDelivered())
  }
  /** @param {string} id @param {string} reaction */
  function toggle(id, reaction) {
    const mineAlready = room.reactions().get(id)?.get(reaction)?.includes(user) ?? false
    room.react(id, reaction, !mineAlready)
  }
  /** @type {string | null} */
  let replying = null
  /** @param {string | null} id */
  function replyTo(id) {
    replying = id
    const target = id ? room.message(id) : null
    const banner = element('replying')
    banner.hidden = !target
    const what = /** @type {HTMLElement} */ (banner.querySelector('span'))
    what.textContent = target ? `Replying to ${target.author}: ${target.text.slice(0, 60)}` : ''
    if (target) element('message').focus()
  }
  element('replying').querySelector('button')?.addEventListener('click', () => replyTo(null))
  room.onChange(renderMessages)
  chatStored.onChange(renderMessages)
  renderMessages()
  list.scrollTop = list.scrollHeight

  // ----- presence and typing -----

  /** @param {any} state @returns {string | null} */
  const nameOf = (state) => {
    if (!state || typeof state !== 'object') return null
    if (typeof state.user === 'string') return state.user
    if (state.user && typeof state.user.name === 'string') return state.user.name
    if (typeof state.name === 'string') return state.name
    return null
  }
  function renderPresence() {
    const awareness = chatProvider.awareness
    if (!awareness) return
    /** @type {Set<string>} */
    const here = new Set()
    /** @type {Set<string>} */
    const typing = new Set()
    for (const [client, state] of awareness.getStates()) {
      if (client === awareness.clientID) continue
      const name = nameOf(state)
      if (!name) continue
      here.add(name)
      if (state.typing === true && name !== user) typing.add(name)
    }
    const people = element('people')
    people.replaceChildren(
      ...[user, ...[...here].filter((n) => n !== user).sort()].map((name) => {
        const li = document.createElement('li')
        li.textContent = name === user ? `${name} (you)` : name
        li.style.setProperty('--user-colour', colourOf(name).color)
        return li
      }),
    )
    const names = [...typing].sort()
    element('typing').textContent =
      names.length === 0 ? '' : `${names.join(', ')} ${names.length === 1 ? 'is' : 'are'} typing…`
  }
  chatProvider.awareness?.on('change', renderPresence)
  renderPresence()

  const input = /** @type {HTMLInputElement} */ (element('message'))
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let typingTimer
  const setTyping = (/** @type {boolean} */ on) => {
    const awareness = chatProvider.awareness
    if (awareness && (awareness.getLocalState()?.typing === true) !== on) awareness.setLocalStateField('typing', on)
  }
  input.addEventListener('input', () => {
    setTyping(input.value.length > 0)
    clearTimeout(typingTimer)
    typingTimer = setTimeout(() => setTyping(false), TYPING_IDLE_MS)
  })
  element('send-form').addEventListener('submit', (event) => {
    event.preventDefault()
    const text = input.value.trim()
    if (!text) return
    room.send(text, replying ? { replyTo: replying } : {})
    replyTo(null)
    input.value = ''
    clearTimeout(typingTimer)
    setTyping(false)
    list.scrollTop = list.scrollHeight
  })

  showConnection()
  document.body.dataset.ready = 'true'
}

/** @param {string} text */
function showProblem(text) {
  const problem = element('problem')
  problem.textContent = text
  problem.hidden = false
}

main().catch((error) => {
  console.error(error)
  showProblem(`Something went wrong: ${error?.message ?? error}`)
})
