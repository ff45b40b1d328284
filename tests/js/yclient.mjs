// A stock Yjs client (yjs + y-websocket's WebsocketProvider) driven by a Rust test.
//
// Usage: node yclient.mjs MODULES_DIR SERVER_URL ROOM
//   MODULES_DIR  a directory whose node_modules holds yjs, y-websocket and ws (the test installs
//                them outside the repository's tracked files, so they are loaded from there)
//   SERVER_URL   e.g. ws://127.0.0.1:1234/yjs; the provider appends "/" + ROOM
//
// It prints one JSON object per line on stdout:
//   {"event":"client","clientId":N}            once, first
//   {"event":"status","status":"connected"}    connection status changes
//   {"event":"synced","synced":true,"text":T}  the provider's synced flag changed
//   {"event":"text","text":T}                  after every change of the Y.Text "text"
//   {"event":"awareness","states":{ID:STATE}}  after every awareness change, all known states
//   {"event":"watchdog","lastMessage":MS,"connected":B}
//                                              answer to "watchdog": when the provider last got a
//                                              message (its 30 s reconnect watchdog reads this)
//   {"event":"error","message":M}              a command failed
// and reads commands from stdin, one per line:
//   insert POS TEXT      inserts TEXT (the rest of the line) at UTF-16 offset POS
//   delete POS LEN       deletes LEN UTF-16 code units at POS
//   awareness JSON       sets the local awareness state (null: none)
//   watchdog             reports the provider's last-message time
//   quit                 disconnects (announcing the awareness removal) and exits

import { createRequire } from 'node:module'
import path from 'node:path'
import readline from 'node:readline'

const [modulesDir, serverUrl, room] = process.argv.slice(2)
if (!modulesDir || !serverUrl || !room) {
  console.error('usage: node yclient.mjs MODULES_DIR SERVER_URL ROOM')
  process.exit(2)
}

// The CommonJS builds, resolved from MODULES_DIR, so that y-websocket and this script share one
// instance of yjs.
const require = createRequire(path.join(path.resolve(modulesDir), 'yclient.cjs'))
const Y = require('yjs')
const { WebsocketProvider } = require('y-websocket')
const WebSocket = require('ws')

const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')

const doc = new Y.Doc()
const text = doc.getText('text')
emit({ event: 'client', clientId: doc.clientID })

const provider = new WebsocketProvider(serverUrl, room, doc, {
  WebSocketPolyfill: WebSocket,
  disableBc: true
})
provider.on('status', ({ status }) => emit({ event: 'status', status }))
provider.on('sync', (synced) => emit({ event: 'synced', synced, text: text.toString() }))
text.observe(() => emit({ event: 'text', text: text.toString() }))
provider.awareness.on('change', () => {
  const states = {}
  provider.awareness.getStates().forEach((state, clientId) => {
    states[clientId] = state
  })
  emit({ event: 'awareness', states })
})

const quit = () => {
  provider.destroy()
  process.exit(0)
}

const lines = readline.createInterface({ input: process.stdin })
lines.on('line', (line) => {
  const space = line.indexOf(' ')
  const command = space < 0 ? line : line.slice(0, space)
  const rest = space < 0 ? '' : line.slice(space + 1)
  try {
    if (command === 'insert') {
      const at = rest.indexOf(' ')
      text.insert(Number(rest.slice(0, at)), rest.slice(at + 1))
    } else if (command === 'delete') {
      const [pos, len] = rest.split(' ').map(Number)
      text.delete(pos, len)
    } else if (command === 'awareness') {
      provider.awareness.setLocalState(JSON.parse(rest))
    } else if (command === 'watchdog') {
      emit({ event: 'watchdog', lastMessage: provider.wsLastMessageReceived, connected: provider.wsconnected })
    } else if (command === 'quit') {
      quit()
    } else if (command !== '') {
      emit({ event: 'error', message: `unknown command ${command}` })
    }
  } catch (e) {
    emit({ event: 'error', message: String(e) })
  }
})
// The test going away (stdin closed) ends the client too.
lines.on('close', quit)
