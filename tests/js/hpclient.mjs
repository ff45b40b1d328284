// A stock Hocuspocus client (@hocuspocus/provider + yjs) driven by a Rust test: one
// HocuspocusProviderWebsocket carrying any number of HocuspocusProviders (documents).
//
// Usage: node hpclient.mjs MODULES_DIR SERVER_URL [PACKAGE]
//   MODULES_DIR  a directory whose node_modules holds @hocuspocus/provider, yjs and ws (installed
//                by the test outside the repository's tracked files, so they are loaded from there)
//   SERVER_URL   e.g. ws://127.0.0.1:1234/hocuspocus; the provider opens this URL as is (minus
//                trailing slashes)
//   PACKAGE      the provider package to load, "@hocuspocus/provider" by default (an npm alias
//                such as "@hocuspocus/provider-v3" lets one MODULES_DIR hold a 3.x provider too)
// The provider's major version (3 or 4) is read from its package.json; see HOCUSPOCUS-PROVIDER.md.
//
// It prints one JSON object per line on stdout. Events of the socket:
//   {"event":"ready","package":P,"version":"4.8.0","major":4}   once, first
//   {"event":"socket","status":S}                    socket status: connecting/connected/disconnected
//                                                    ("connected" on open, and again with the
//                                                    first frame)
//   {"event":"connect"}                              the first frame of a connection arrived
//   {"event":"socketClose","code":C,"reason":R}      the WebSocket closed (also 4408 "forced" by the
//                                                    provider's 30 s watchdog)
// Events of a provider, all with "name" (the test's handle for it):
//   {"event":"attached","name":N,"doc":D,"address":A,"sessionId":S|null,"clientId":ID}
//   {"event":"authenticated","name":N,"scope":"read-write"|"readonly"}
//   {"event":"authenticationFailed","name":N,"reason":R}
//   {"event":"synced","name":N,"synced":true,"text":T}   the provider's synced flag became true
//   {"event":"unsynced","name":N,"count":K}          every "unsyncedChanges" event of the provider
//                                                    (the value may repeat: 1 -> 1 on a new sync)
//   {"event":"text","name":N,"text":T}               after every change of the Y.Text "text"
//   {"event":"awareness","name":N,"states":{ID:STATE}}  after every awareness change, all states
//   {"event":"stateless","name":N,"payload":P}
//   {"event":"disconnect","name":N,"code":C,"reason":R}  the socket closed (forwarded to each provider)
//   {"event":"close","name":N,"code":C,"reason":R,"document":B}
//                                                    document=false: the socket closed;
//                                                    document=true: the server sent CLOSE(reason)
//                                                    for this document only (code is then 1000)
//   {"event":"detached","name":N} / {"event":"destroyed","name":N}
//   {"event":"status","name":N,...}                  answer to "status NAME" (see below)
// and:
//   {"event":"status","socket":S,...}                answer to "status" (no name)
//   {"event":"error","name":N|null,"message":M}      a command failed, or the provider threw
//   {"event":"warning","message":M}                 the provider logged something (also on stderr)
//
// It reads commands from stdin, one per line:
//   attach NAME DOC TOKEN [session]  a new provider NAME for document DOC on the shared socket,
//                                    with TOKEN ("-" for none); "session" sets sessionAwareness
//                                    (4.x only: the address becomes DOC + "\0" + sessionId)
//   insert NAME POS TEXT             inserts TEXT (the rest of the line) at UTF-16 offset POS
//   mapset NAME MAP KEY JSON         sets KEY of the document's Y.Map MAP to the JSON value
//   delete NAME POS LEN              deletes LEN UTF-16 code units at POS
//   awareness NAME JSON              sets the local awareness state (null: none)
//   stateless NAME PAYLOAD           sendStateless(PAYLOAD), PAYLOAD being the rest of the line
//   detach NAME                      provider.detach(): sends CLOSE, keeps the document; edits
//                                    stay local until "reattach"
//   reattach NAME                    provider.attach() again (token, SyncStep1, awareness)
//   destroy NAME                     provider.destroy(): awareness removal, CLOSE, forgets NAME
//   disconnect                       closes the socket (no reconnect)
//   connect                          opens the socket again (providers re-authenticate and sync)
//   status NAME                      answers {"event":"status","name":N,"doc","address",
//                                    "attached","authenticated","scope","synced","unsynced",
//                                    "text","clientId","socket","lastMessageReceived"}
//   status                           answers {"event":"status","socket","lastMessageReceived",
//                                    "names":[...]}
//   quit                             destroys every provider and the socket, and exits
// Setting HPCLIENT_TRACE=1 logs every frame sent and received, in hex, on stderr.

import { createRequire } from 'node:module'
import fs from 'node:fs'
import path from 'node:path'
import readline from 'node:readline'

const [modulesDir, serverUrl, packageName = '@hocuspocus/provider'] = process.argv.slice(2)
if (!modulesDir || !serverUrl) {
  process.stderr.write('usage: node hpclient.mjs MODULES_DIR SERVER_URL [PACKAGE]\n')
  process.exit(2)
}

// The test going away must not crash us on a write to a closed pipe.
process.stdout.on('error', () => process.exit(0))
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')
const log = (line) => process.stderr.write(`hpclient: ${line}\n`)
const describe = (e) => (e && e.stack) || String(e)

// The provider reports problems with console.*: keep them off stdout, and make them visible.
for (const level of ['log', 'info', 'warn', 'error', 'debug']) {
  console[level] = (...args) => {
    const message = args.map((a) => (typeof a === 'string' ? a : describe(a))).join(' ')
    log(`[console.${level}] ${message}`)
    emit({ event: 'warning', message })
  }
}
// Whatever escapes (a rejected async handler, a throw in a timer) is reported, never fatal.
process.on('uncaughtException', (e) => {
  log(`uncaught: ${describe(e)}`)
  emit({ event: 'error', name: null, message: `uncaught: ${e}` })
})
process.on('unhandledRejection', (e) => {
  log(`unhandled rejection: ${describe(e)}`)
  emit({ event: 'error', name: null, message: `unhandled rejection: ${e}` })
})

// The CommonJS builds, resolved from MODULES_DIR, so that the provider and this script share one
// instance of yjs.
const require = createRequire(path.join(path.resolve(modulesDir), 'hpclient.cjs'))
const Y = require('yjs')
const WebSocket = require('ws')
const hp = require(packageName)

// The provider's own package.json (its "exports" hide it from require).
const providerVersion = (() => {
  let dir = path.dirname(require.resolve(packageName))
  for (;;) {
    const manifest = path.join(dir, 'package.json')
    if (fs.existsSync(manifest)) {
      const json = JSON.parse(fs.readFileSync(manifest, 'utf8'))
      if (json.name === '@hocuspocus/provider') return json.version
    }
    const parent = path.dirname(dir)
    if (parent === dir) return 'unknown'
    dir = parent
  }
})()
const major = Number.parseInt(providerVersion, 10)

const trace = !!process.env.HPCLIENT_TRACE
const hex = (data) =>
  data instanceof ArrayBuffer
    ? Buffer.from(data).toString('hex')
    : ArrayBuffer.isView(data)
      ? Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('hex')
      : String(data)

// `ws`, hardened: an exception thrown by the provider in a WebSocket listener (a 3.x provider
// throws on a frame type it does not know, e.g. a bare Ping byte) would otherwise escape into
// ws' frame parser, which then stops delivering frames; and an "error" emitted after the
// provider removed its listeners (closing a socket that is still connecting) would crash node.
class GuardedWebSocket extends WebSocket {
  constructor(...args) {
    super(...args)
    this.wrappedListeners = new Map()
    this.on('error', (e) => log(`websocket error: ${e.message}`))
  }

  addEventListener(type, listener, options) {
    const wrapped = (event) => {
      if (trace && type === 'message') log(`<- ${hex(event.data)}`)
      try {
        listener.call(this, event)
      } catch (e) {
        const frame = type === 'message' ? hex(event.data).slice(0, 64) : undefined
        log(`the provider threw in its ${type} listener${frame ? ` (frame ${frame})` : ''}: ${describe(e)}`)
        emit({ event: 'error', name: null, message: `provider threw on ${type}: ${e}`, frame })
      }
    }
    if (!this.wrappedListeners.has(type)) this.wrappedListeners.set(type, new Map())
    this.wrappedListeners.get(type).set(listener, wrapped)
    super.addEventListener(type, wrapped, options)
  }

  removeEventListener(type, listener) {
    const wrapped = this.wrappedListeners.get(type)?.get(listener)
    this.wrappedListeners.get(type)?.delete(listener)
    super.removeEventListener(type, wrapped ?? listener)
  }

  send(data, ...rest) {
    if (trace) log(`-> ${hex(data)}`)
    super.send(data, ...rest)
  }
}

// Provider callbacks run inside the provider's own emit loop, which does not catch: never throw.
const guard = (what, fn) => (...args) => {
  try {
    fn(...args)
  } catch (e) {
    log(`${what}: ${describe(e)}`)
    emit({ event: 'error', name: null, message: `${what}: ${e}` })
  }
}

emit({ event: 'ready', package: packageName, version: providerVersion, major })

// A socket-level "close" runs the socket's own listeners (this one first) and then each attached
// provider's; a document-level CLOSE from the server emits only the provider's "close".
let socketClosing = false
const socket = new hp.HocuspocusProviderWebsocket({
  url: serverUrl,
  WebSocketPolyfill: GuardedWebSocket,
  onStatus: guard('onStatus', ({ status }) => emit({ event: 'socket', status })),
  onConnect: guard('onConnect', () => emit({ event: 'connect' })),
  onClose: guard('onClose', ({ event }) => {
    socketClosing = true
    queueMicrotask(() => {
      socketClosing = false
    })
    emit({ event: 'socketClose', code: event?.code ?? null, reason: event?.reason ?? '' })
  }),
})
// The provider's forced close (its watchdog gave up) bypasses "close": report it from "disconnect".
socket.on('disconnect', guard('disconnect', ({ event }) => {
  if (!socketClosing) emit({ event: 'socketClose', code: event?.code ?? null, reason: event?.reason ?? '' })
}))

/** The providers, by the test's NAME: { provider, doc, text, docName }. */
const clients = new Map()

const client = (name) => {
  const found = clients.get(name)
  if (!found) throw new Error(`no provider named ${name}`)
  return found
}

const awarenessStates = (provider) => {
  const states = {}
  provider.awareness?.getStates().forEach((state, clientId) => {
    states[clientId] = state
  })
  return states
}

const attach = (name, docName, token, flags) => {
  if (!name || !docName || token === undefined) throw new Error('usage: attach NAME DOC TOKEN [session]')
  if (clients.has(name)) throw new Error(`a provider named ${name} exists`)
  const session = flags.includes('session')
  if (session && major < 4) throw new Error(`sessionAwareness needs a 4.x provider, this is ${providerVersion}`)
  const doc = new Y.Doc()
  const text = doc.getText('text')
  const provider = new hp.HocuspocusProvider({
    websocketProvider: socket,
    name: docName,
    document: doc,
    token: token === '-' ? null : token,
    ...(session ? { sessionAwareness: true } : {}),
  })
  const address = provider.effectiveName ?? docName
  if (socket.configuration.providerMap.has(address)) {
    // 4.x would throw (if the other one is authenticated) or silently replace it, 3.x always
    // replaces it: refuse, and drop the provider, which has not touched the socket yet.
    provider.document.off('update', provider.boundDocumentUpdateHandler)
    provider.awareness?.destroy()
    throw new Error(`another provider on this socket uses the address ${JSON.stringify(address)} (use "session", 4.x only)`)
  }
  const on = (event, fn) => provider.on(event, guard(`${name} ${event}`, fn))
  on('authenticated', ({ scope }) => emit({ event: 'authenticated', name, scope }))
  on('authenticationFailed', ({ reason }) => emit({ event: 'authenticationFailed', name, reason }))
  on('synced', ({ state }) => emit({ event: 'synced', name, synced: state, text: text.toString() }))
  on('unsyncedChanges', ({ number }) => emit({ event: 'unsynced', name, count: number }))
  on('stateless', ({ payload }) => emit({ event: 'stateless', name, payload }))
  on('disconnect', ({ event }) =>
    emit({ event: 'disconnect', name, code: event?.code ?? null, reason: event?.reason ?? '' }))
  on('close', ({ event }) =>
    emit({ event: 'close', name, code: event?.code ?? null, reason: event?.reason ?? '', document: !socketClosing }))
  text.observe(guard(`${name} text`, () => emit({ event: 'text', name, text: text.toString() })))
  provider.awareness?.on('change', guard(`${name} awareness`, () =>
    emit({ event: 'awareness', name, states: awarenessStates(provider) })))
  clients.set(name, { provider, doc, text, docName })
  // With a shared socket the provider does not attach itself.
  try {
    provider.attach()
  } catch (e) {
    clients.delete(name)
    throw e
  }
  emit({
    event: 'attached',
    name,
    doc: docName,
    address,
    sessionId: session ? provider.sessionId : null,
    clientId: doc.clientID,
  })
}

const status = (name) => {
  const socketStatus = { socket: socket.status, lastMessageReceived: socket.lastMessageReceived }
  if (!name) {
    emit({ event: 'status', ...socketStatus, names: [...clients.keys()] })
    return
  }
  const { provider, doc, text, docName } = client(name)
  emit({
    event: 'status',
    name,
    doc: docName,
    address: provider.effectiveName ?? docName,
    attached: provider.isAttached,
    authenticated: provider.isAuthenticated,
    scope: provider.authorizedScope ?? null,
    synced: provider.synced,
    unsynced: provider.unsyncedChanges,
    text: text.toString(),
    clientId: doc.clientID,
    ...socketStatus,
  })
}

let quitting = false
const quit = () => {
  if (quitting) return
  quitting = true
  for (const [name, { provider }] of clients) {
    try {
      provider.destroy()
    } catch (e) {
      log(`destroying ${name}: ${describe(e)}`)
    }
  }
  clients.clear()
  try {
    socket.destroy()
  } catch (e) {
    log(`destroying the socket: ${describe(e)}`)
  }
  // Give the awareness removals and CLOSE frames a moment to leave.
  setTimeout(() => process.exit(0), 100)
}

// "WORD WORD REST": the first `count` space-separated words, then the rest of the line verbatim.
const split = (line, count) => {
  const words = []
  let rest = line
  for (let i = 0; i < count; i++) {
    const space = rest.indexOf(' ')
    if (space < 0) {
      words.push(rest)
      rest = undefined
      break
    }
    words.push(rest.slice(0, space))
    rest = rest.slice(space + 1)
  }
  return [...words, rest]
}

const number = (value, what) => {
  const n = Number(value)
  if (value === undefined || value === '' || !Number.isInteger(n)) throw new Error(`${what} is not an integer: ${value}`)
  return n
}

const lines = readline.createInterface({ input: process.stdin })
lines.on('line', (line) => {
  const [command, rest = ''] = split(line.replace(/\r$/, ''), 1)
  let name = null
  try {
    if (command === 'attach') {
      const [n, docName, token, ...flags] = rest.split(' ').filter((w) => w !== '')
      name = n ?? null
      attach(n, docName, token, flags)
    } else if (command === 'insert') {
      const [n, pos, value = ''] = split(rest, 2)
      name = n
      client(n).text.insert(number(pos, 'POS'), value)
    } else if (command === 'mapset') {
      const [n, map, key, json] = split(rest, 3)
      name = n
      client(n).provider.document.getMap(map).set(key, JSON.parse(json))
    } else if (command === 'delete') {
      const [n, pos, len] = rest.split(' ')
      name = n
      client(n).text.delete(number(pos, 'POS'), number(len, 'LEN'))
    } else if (command === 'awareness') {
      const [n, json] = split(rest, 1)
      name = n
      const { provider } = client(n)
      if (!provider.awareness) throw new Error('awareness is disabled')
      provider.awareness.setLocalState(JSON.parse(json))
    } else if (command === 'stateless') {
      const [n, payload = ''] = split(rest, 1)
      name = n
      client(n).provider.sendStateless(payload)
    } else if (command === 'detach') {
      name = rest
      client(rest).provider.detach()
      emit({ event: 'detached', name })
    } else if (command === 'reattach') {
      name = rest
      client(rest).provider.attach()
    } else if (command === 'destroy') {
      name = rest
      const { provider } = client(rest)
      clients.delete(rest)
      provider.destroy()
      emit({ event: 'destroyed', name })
    } else if (command === 'disconnect') {
      socket.disconnect()
    } else if (command === 'connect') {
      Promise.resolve(socket.connect()).catch((e) => emit({ event: 'error', name: null, message: `connect: ${e}` }))
    } else if (command === 'status') {
      name = rest || null
      status(rest)
    } else if (command === 'quit') {
      quit()
    } else if (command !== '') {
      emit({ event: 'error', name: null, message: `unknown command ${command}` })
    }
  } catch (e) {
    emit({ event: 'error', name, message: String(e?.message ?? e) })
  }
})
// The test going away (stdin closed) ends the client too.
lines.on('close', quit)
