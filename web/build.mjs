// Builds the page the server embeds: `dist/index.html`, `dist/app.js`, `dist/app.css`.
// Deterministic: the same sources and lockfile give the same bytes (`.ci/run` checks that the
// committed bundle is what this builds). The asset URLs carry a hash of their content, so the
// server can let browsers cache them for ever.
import { createHash } from 'node:crypto'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import * as esbuild from 'esbuild'

const here = dirname(fileURLToPath(import.meta.url))
// `--out DIR` builds elsewhere (the tests compare that with the committed `dist/`).
const at = process.argv.indexOf('--out')
const dist = at > 0 ? process.argv[at + 1] : join(here, 'dist')
mkdirSync(dist, { recursive: true })

const common = { bundle: true, minify: true, write: false, legalComments: 'eof', logLevel: 'warning', charset: 'utf8' }
const js = await esbuild.build({
  ...common,
  entryPoints: [join(here, 'src/app.js')],
  format: 'esm',
  target: ['chrome110', 'firefox115', 'safari16'],
})
const css = await esbuild.build({ ...common, entryPoints: [join(here, 'src/style.css')] })

const hash = (bytes) => createHash('sha256').update(bytes).digest('hex').slice(0, 16)
const jsBytes = js.outputFiles[0].contents
const cssBytes = css.outputFiles[0].contents
const html = readFileSync(join(here, 'src/index.html'), 'utf8')
  .replace('__JS_HASH__', hash(jsBytes))
  .replace('__CSS_HASH__', hash(cssBytes))

writeFileSync(join(dist, 'app.js'), jsBytes)
writeFileSync(join(dist, 'app.css'), cssBytes)
writeFileSync(join(dist, 'index.html'), html)
console.log(`${dist}: app.js ${jsBytes.length} B, app.css ${cssBytes.length} B, index.html ${html.length} B`)
