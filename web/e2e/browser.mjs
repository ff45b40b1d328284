// The web app in a real browser (Debian's chromium, driven by playwright-core), against a
// running `driftsync serve`. Run by cli/tests/webapp.rs:
//   node e2e/browser.mjs --server http://127.0.0.1:PORT --cli PATH/driftsync --work DIR [--screenshot PNG]
// Prints one line per step; exits non-zero on the first failure.
import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { chromium } from 'playwright-core'

const { values: args } = parseArgs({
  options: {
    server: { type: 'string' },
    cli: { type: 'string' },
    work: { type: 'string' },
    screenshot: { type: 'string' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    // A second server, with a secret, and a token it accepts (for user erin on every document).
    'auth-server': { type: 'string' },
    'auth-token': { type: 'string' },
  },
})
if (!args.server || !args.cli || !args.work) throw new Error('usage: --server URL --cli PATH --work DIR')

const TIMEOUT = 20_000
const started = Date.now()
const step = (text) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${text}`)

/** Polls `read` until `ok(value)`; fails with the last value after TIMEOUT. */
async function until(what, read, ok = (v) => Boolean(v), timeout = TIMEOUT) {
  const deadline = Date.now() + timeout
  let last
  for (;;) {
    last = await read()
    if (ok(last)) return last
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last seen: ${JSON.stringify(last)}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

/** Stays true of `read` for `ms`. */
async function stays(what, read, ok, ms) {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    const value = await read()
    if (!ok(value)) throw new Error(`${what}: ${JSON.stringify(value)}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

const id = randomBytes(4).toString('hex')
const docId = `notes/e2e-${id}`
const room = `e2e-${id}`
const page = (user) => `${args.server}/?doc=${encodeURIComponent(docId)}&room=${room}&user=${user}`

const browser = await chromium.launch({
  executablePath: args.chromium,
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
})

/** What a page shows, read from its DOM. */
const view = (p) =>
  p.evaluate(() => ({
    text: window.driftsyncDebug?.text(),
    connection: document.getElementById('connection')?.dataset.state,
    saved: document.getElementById('saved')?.dataset.state,
    people: [...document.querySelectorAll('#people li')].map((li) => li.textContent),
    typing: document.getElementById('typing')?.textContent ?? '',
    messages: [...document.querySelectorAll('#messages li')].map((li) => ({
      author: li.querySelector('.author')?.textContent,
      text: li.querySelector('.text')?.textContent,
      status: li.querySelector('.status')?.dataset.state ?? null,
      reactions: li.querySelector('.reactions')?.textContent ?? '',
      reply: li.querySelector('.reply:not([hidden])')?.textContent ?? '',
      readers: li.querySelector('.status')?.textContent ?? '',
    })),
  }))
const message = (v, text) => v.messages.find((m) => m.text === text)

try {
  const ada = await browser.newContext({ viewport: { width: 1100, height: 700 } })
  const bob = await browser.newContext({ viewport: { width: 1100, height: 700 } })
  const a = await ada.newPage()
  const b = await bob.newPage()
  for (const p of [a, b]) {
    p.on('pageerror', (e) => console.log(`page error: ${e.message}`))
    p.on('console', (m) => m.type() === 'error' && console.log(`console: ${m.text()}`))
  }
  await a.goto(page('ada'))
  await b.goto(page('bob'))
  for (const p of [a, b]) await until('the page to be online', () => view(p), (v) => v.connection === 'online')
  step('two contexts online')

  // Presence: each sees the other.
  await until('ada to see bob', () => view(a), (v) => v.people.includes('bob'))
  await until('bob to see ada', () => view(b), (v) => v.people.includes('ada'))
  step('presence shows both')

  // Text typed in one appears in the other.
  await a.locator('.cm-content').click()
  await a.keyboard.type('Hello from ada. ')
  await until('bob to see ada\'s text', () => view(b), (v) => v.text === 'Hello from ada. ')
  await b.locator('.cm-content').click()
  await b.keyboard.press('End')
  await b.keyboard.type('And bob.')
  await until('ada to see bob\'s text', () => view(a), (v) => v.text === 'Hello from ada. And bob.')
  await until('ada\'s text to be saved', () => view(a), (v) => v.saved === 'saved')
  step('text converges and is saved')

  // Typing shows.
  await b.getByLabel('Message').fill('')
  await b.getByLabel('Message').pressSequentially('hi')
  await until('ada to see bob typing', () => view(a), (v) => v.typing === 'bob is typing…')
  step('typing shows')

  // A message appears with its author; the sender sees it saved, then read.
  await b.getByLabel('Message').fill('hi ada')
  await b.getByRole('button', { name: 'Send' }).click()
  await until('ada to get bob\'s message', () => view(a), (v) => message(v, 'hi ada')?.author === 'bob')
  await until('the typing line to clear', () => view(a), (v) => v.typing === '')
  const sent = await until('bob\'s message to be saved, delivered or read', () => view(b), (v) =>
    ['saved', 'delivered', 'read'].includes(message(v, 'hi ada')?.status))
  step(`bob sees his message ${message(sent, 'hi ada').status}`)
  await until('bob to see it read by ada', () => view(b), (v) => message(v, 'hi ada')?.readers === '✓✓ Read by ada')
  step('bob sees it read by ada')

  // Read only once scrolled into view: ada scrolls up, bob writes, ada has not read it.
  for (let i = 0; i < 14; i++) {
    await b.getByLabel('Message').fill(`filler ${i}`)
    await b.getByRole('button', { name: 'Send' }).click()
  }
  await until('ada to get the fillers', () => view(a), (v) => message(v, 'filler 13'))
  await a.evaluate(() => (document.getElementById('messages').scrollTop = 0))
  await b.getByLabel('Message').fill('down here')
  await b.getByRole('button', { name: 'Send' }).click()
  await until('ada to get "down here"', () => view(a), (v) => message(v, 'down here'))
  // Ada's page holds it (a delivery receipt), but has not shown it.
  await until('"down here" to be delivered', () => view(b), (v) => message(v, 'down here')?.status === 'delivered')
  await stays('"down here" is not read while out of view', () => view(b), (v) => message(v, 'down here')?.status === 'delivered', 1500)
  await a.evaluate(() => {
    const list = document.getElementById('messages')
    list.scrollTop = list.scrollHeight
  })
  await until('"down here" read once in view', () => view(b), (v) => message(v, 'down here')?.status === 'read')
  step('a message is delivered at once, read only once scrolled into view')

  // Reactions and replies.
  const bubble = (p, text) => p.locator('#messages li', { hasText: text }).last()
  await bubble(b, 'down here').hover()
  await bubble(b, 'down here').getByRole('button', { name: 'Reply' }).click()
  await b.getByLabel('Message').fill('answering myself')
  await b.getByRole('button', { name: 'Send' }).click()
  await until('ada to see the reply', () => view(a), (v) => message(v, 'answering myself')?.reply === '↪ bob: down here')
  await bubble(a, 'answering myself').hover()
  await bubble(a, 'answering myself').getByRole('button', { name: '👍' }).click()
  await until('bob to see ada\'s reaction', () => view(b), (v) => message(v, 'answering myself')?.reactions === '👍 1')
  await bubble(b, 'answering myself').getByRole('button', { name: '👍 1' }).click()
  await until('ada to see two', () => view(a), (v) => message(v, 'answering myself')?.reactions === '👍 2')
  step('replies and reactions cross')

  // Offline: ada edits and sends, reloads while still offline, edits again, comes back.
  await a.getByLabel('Offline').check()
  await until('ada to be offline', () => view(a), (v) => v.connection === 'offline')
  await a.locator('.cm-content').click()
  await a.keyboard.press('Control+End')
  await a.keyboard.type(' Written offline.')
  for (const text of ['offline 1', 'offline 2']) {
    await a.getByLabel('Message').fill(text)
    await a.getByRole('button', { name: 'Send' }).click()
  }
  await b.getByLabel('Message').fill('while you were away')
  await b.getByRole('button', { name: 'Send' }).click()
  let seen = await view(a)
  if (message(seen, 'offline 1')?.status !== 'sending') throw new Error(`offline message not "sending": ${JSON.stringify(seen)}`)
  if (message(seen, 'while you were away')) throw new Error('an offline page received a message')
  step('offline: edits and messages kept as "sending"')
  await a.reload()
  await until('the reloaded page to be ready', () => a.evaluate(() => document.body.dataset.ready === 'true'))
  seen = await view(a)
  if (seen.connection !== 'offline') throw new Error(`the reload went online: ${seen.connection}`)
  if (!seen.text.endsWith(' Written offline.')) throw new Error(`offline text lost in the reload: ${seen.text}`)
  for (const text of ['offline 1', 'offline 2']) {
    if (message(seen, text)?.status !== 'sending') throw new Error(`"${text}" lost or not sending after reload: ${JSON.stringify(seen.messages)}`)
  }
  step('reloaded offline: nothing lost')
  await a.locator('.cm-content').click()
  await a.keyboard.press('Control+End')
  await a.keyboard.type(' And after the reload.')
  await a.getByLabel('Message').fill('offline 3')
  await a.getByRole('button', { name: 'Send' }).click()
  await a.getByLabel('Offline').uncheck()
  await until('ada to be online again', () => view(a), (v) => v.connection === 'online')
  const expected = 'Hello from ada. And bob. Written offline. And after the reload.'
  for (const [name, p] of [['ada', a], ['bob', b]]) {
    await until(`${name}'s text to converge`, () => view(p), (v) => v.text === expected)
    await until(`${name} to have every message`, () => view(p), (v) =>
      ['offline 1', 'offline 2', 'offline 3', 'while you were away'].every((t) => message(v, t)))
  }
  const order = async (p) => (await view(p)).messages.map((m) => `${m.author}: ${m.text}`)
  await until('the same order on both', async () => [await order(a), await order(b)], ([x, y]) =>
    JSON.stringify(x) === JSON.stringify(y))
  await until('ada\'s offline messages to be saved', () => view(a), (v) =>
    ['offline 1', 'offline 2', 'offline 3'].every((t) => ['saved', 'delivered', 'read'].includes(message(v, t)?.status)))
  await until('ada\'s text to be saved', () => view(a), (v) => v.saved === 'saved')
  step('back online: both converge, same order, all saved')

  // The CLI and the page: a message sent from the terminal appears; the page's text is what
  // the terminal shows after a sync.
  const store = join(args.work, 'carol.db')
  const server = args.server.replace(/^http/, 'ws')
  const cli = (...rest) => execFileSync(args.cli, ['client', '--store', store, '--user', 'carol', ...rest], { encoding: 'utf8' })
  cli('chat', 'send', `chat/${room}`, 'hello from the terminal')
  cli('sync', '--server', server, '--once', '--doc', docId)
  await until('the terminal\'s message in both pages', async () => [await view(a), await view(b)], (vs) =>
    vs.every((v) => message(v, 'hello from the terminal')?.author === 'carol'))
  const shown = cli('text', 'show', docId).replace(/\n$/, '')
  if (shown !== expected) throw new Error(`driftsync client text show printed ${JSON.stringify(shown)}, the page has ${JSON.stringify(expected)}`)
  step('the CLI\'s message shows in the page; the CLI shows the page\'s text')

  // A server with a secret: the page asks for a token, then acts as the token's user.
  if (args['auth-server'] && args['auth-token']) {
    const c = await (await browser.newContext()).newPage()
    await c.goto(`${args['auth-server']}/?doc=notes/secret-${id}&room=secret-${id}`)
    await c.getByLabel('Token').fill(args['auth-token'])
    await c.getByRole('button', { name: 'Join' }).click()
    await until('the page with a token to be online', () => view(c), (v) => v.connection === 'online')
    const me = await c.evaluate(() => document.getElementById('me').textContent)
    if (me !== 'erin') throw new Error(`the page acts as ${me}, not as the token's user`)
    await c.getByLabel('Message').fill('signed in')
    await c.getByRole('button', { name: 'Send' }).click()
    await until('erin\'s message saved', () => view(c), (v) =>
      message(v, 'signed in')?.author === 'erin' && message(v, 'signed in')?.status === 'saved')
    step('with a secret: the page asks for a token and writes as its user')
  }

  // The screenshot of README: both windows side by side, on a fresh document and room.
  if (args.screenshot) {
    const scene = `trip-${id}`
    for (const [p, user] of [[a, 'ada'], [b, 'bob']]) {
      await p.goto(`${args.server}/?doc=notes/${scene}&room=${scene}&user=${user}`)
      await until('the page to be online', () => view(p), (v) => v.connection === 'online')
    }
    await a.locator('.cm-content').click()
    await a.keyboard.type('Lisbon, 12-15 May\n\nFlights: booked\nHotel: somewhere in Alfama\nDay 1: tram 28, pastries in Belém\n')
    await until('bob to see the notes', () => view(b), (v) => v.text?.includes('Belém'))
    await b.locator('.cm-content').click()
    await b.keyboard.press('Control+End')
    await b.keyboard.type('Day 2: Sintra by train')
    const say = async (p, text) => {
      await p.getByLabel('Message').fill(text)
      await p.getByRole('button', { name: 'Send' }).click()
    }
    await say(a, 'Flights are booked! Notes are on the left.')
    await say(b, 'Great, I added Sintra for day 2.')
    await say(a, 'Can you find a hotel in Alfama?')
    await until('ada\'s question read by bob', () => view(a), (v) => message(v, 'Can you find a hotel in Alfama?')?.status === 'read')
    const first = b.locator('#messages li', { hasText: 'Flights are booked!' }).last()
    await first.hover()
    await first.getByRole('button', { name: '👍' }).click()
    await until('ada to see the reaction', () => view(a), (v) => message(v, 'Flights are booked! Notes are on the left.')?.reactions === '👍 1')
    await b.mouse.move(0, 0)
    await b.getByLabel('Message').pressSequentially('On it, looking now')
    await until('ada to see bob typing', () => view(a), (v) => v.typing === 'bob is typing…')
    const shots = await Promise.all([a, b].map((p) => p.screenshot()))
    const board = await (await browser.newContext({ viewport: { width: 2220, height: 720 } })).newPage()
    const img = (png) => `<img src="data:image/png;base64,${png.toString('base64')}">`
    await board.setContent(
      `<body style="margin:0;padding:10px;display:flex;gap:20px;background:#d9dce6">${shots.map(img).join('')}</body>`,
    )
    await board.screenshot({ path: args.screenshot })
    step(`screenshot in ${args.screenshot}`)
  }
  console.log('ok')
} finally {
  await browser.close()
}
