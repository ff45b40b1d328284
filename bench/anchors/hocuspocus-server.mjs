// Hocuspocus 3.4.4 with persistence, for driftsync-bench: documents are stored as one Yjs
// update per document in DATA_DIR through the onLoadDocument/onStoreDocument hooks (what the
// Database extension does), with Hocuspocus's default debounce (2 s, at most 10 s).
// Run from the folder where install-anchors.sh installed @hocuspocus/server (run-all.sh copies it there).
import { Server } from '@hocuspocus/server'
import * as Y from 'yjs'
import { promises as fs } from 'fs'
import path from 'path'

const port = Number(process.env.PORT || 1235)
const dir = process.env.DATA_DIR
const file = name => path.join(dir, encodeURIComponent(name) + '.ydoc')

const server = new Server({
  quiet: true,
  async onLoadDocument ({ documentName, document }) {
    if (!dir) return document
    try {
      Y.applyUpdate(document, new Uint8Array(await fs.readFile(file(documentName))))
    } catch (e) {
      if (e.code !== 'ENOENT') throw e
    }
    return document
  },
  async onStoreDocument ({ documentName, document }) {
    if (!dir) return
    const tmp = file(documentName) + '.tmp'
    await fs.writeFile(tmp, Y.encodeStateAsUpdate(document))
    await fs.rename(tmp, file(documentName))
  }
})
server.httpServer.listen(port, '127.0.0.1', () => console.log(`hocuspocus listening on 127.0.0.1:${port}`))
