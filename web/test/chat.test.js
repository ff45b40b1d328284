// Unit tests of the chat module: `node --test test/` (run by `cargo test` through
// cli/tests/webapp.rs). Rust reads what these write in `engine` (fixtures/js-chat/).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import * as Y from 'yjs'

import {
  ChatError,
  ChatRoom,
  HlcClock,
  MAX_COUNTER,
  MAX_OBSERVED_AHEAD_MS,
  hlcKey,
  parseHlc,
  sortKey,
  uuidv7,
} from '../src/chat.js'

/** Two replicas that exchange every update at once. */
function pair() {
  const a = new Y.Doc()
  const b = new Y.Doc()
  a.on('update', (u, origin) => origin !== 'peer' && Y.applyUpdate(b, u, 'peer'))
  b.on('update', (u, origin) => origin !== 'peer' && Y.applyUpdate(a, u, 'peer'))
  return [a, b]
}

test('stamps and sort keys are written as the Rust engine writes them', () => {
  assert.equal(hlcKey({ wall: 1700000000000, counter: 7 }), '001700000000000.0000000007')
  assert.deepEqual(parseHlc('001700000000000.0000000007'), { wall: 1700000000000, counter: 7 })
  for (const bad of ['1700000000000.7', '001700000000000-0000000007', 'x01700000000000.0000000007', 7, null]) {
    assert.equal(parseHlc(bad), null, String(bad))
  }
  assert.equal(
    sortKey({ wall: 5, counter: 1 }, 42, 'id'),
    '000000000000005.0000000001/0000000000000042/id',
  )
})

test('the clock never goes back, follows others, and ignores a stamp a day ahead', () => {
  const clock = new HlcClock()
  const a = clock.tick(1000)
  const b = clock.tick(900) // the wall clock went back
  const c = clock.tick(1000)
  assert.ok(hlcKey(a) < hlcKey(b) && hlcKey(b) < hlcKey(c))
  clock.observe({ wall: 5000, counter: 3 })
  assert.deepEqual(clock.tick(1000), { wall: 5000, counter: 4 })
  assert.deepEqual(clock.tick(6000), { wall: 6000, counter: 0 })
  clock.observe({ wall: 6000 + MAX_OBSERVED_AHEAD_MS + 10_000, counter: 0 })
  assert.deepEqual(clock.tick(6000), { wall: 6000, counter: 1 }, 'a broken device does not drag us along')
  const full = new HlcClock()
  full.observe({ wall: 10, counter: MAX_COUNTER })
  assert.deepEqual(full.tick(0), { wall: 11, counter: 0 })
})

test('uuidv7 ids are version 7, time-ordered and unique', () => {
  const ids = Array.from({ length: 200 }, (_, i) => uuidv7(1_700_000_000_000 + i))
  for (const id of ids) assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/)
  assert.deepEqual([...ids].sort(), ids)
  assert.equal(new Set(ids).size, ids.length)
  assert.equal(uuidv7(0x0123456789ab).slice(0, 13), '01234567-89ab')
})

test('send, edit and delete; both replicas show the same order', () => {
  const [a, b] = pair()
  let now = 1000
  const ada = new ChatRoom(a, { user: 'ada', device: 'web-1', now: () => now })
  const bob = new ChatRoom(b, { user: 'bob', device: 'phone', now: () => now })
  const m1 = ada.send('hello')
  now = 10 // bob's clock is behind: his reply still sorts after what he saw
  const m2 = bob.send('hi ada')
  assert.deepEqual(ada.messages().map((m) => m.id), [m1, m2])
  assert.deepEqual(
    bob.messages().map((m) => [m.id, m.author, m.text]),
    ada.messages().map((m) => [m.id, m.author, m.text]),
  )
  const first = ada.message(m1)
  assert.equal(first.device, 'web-1')
  assert.equal(first.client, a.clientID)
  assert.equal(first.sort, sortKey(parseHlc(first.hlc), a.clientID, m1))
  assert.throws(() => bob.edit(m1, 'forged'), ChatError)
  assert.throws(() => bob.delete(m1), ChatError)
  assert.throws(() => bob.edit('nope', 'x'), ChatError)
  now = 2000
  ada.edit(m1, 'hello!')
  assert.equal(bob.message(m1).text, 'hello!')
  assert.equal(bob.message(m1).edited, 2000)
  bob.delete(m2)
  const gone = ada.message(m2)
  assert.ok(gone.deleted)
  assert.equal(gone.text, '')
  assert.equal(ada.messages().length, 2, 'a deletion is a tombstone')
})

test('concurrent messages converge to one order on every replica', () => {
  const docs = [new Y.Doc(), new Y.Doc(), new Y.Doc()]
  const rooms = docs.map((doc, i) => new ChatRoom(doc, { user: `u${i}`, device: 'd', now: () => 5000 }))
  for (let round = 0; round < 5; round++) rooms.forEach((room, i) => room.send(`m${round}.${i}`))
  for (const from of docs) for (const to of docs) if (from !== to) Y.applyUpdate(to, Y.encodeStateAsUpdate(from))
  const orders = rooms.map((room) => room.messages().map((m) => m.id))
  assert.equal(orders[0].length, 15)
  assert.deepEqual(orders[1], orders[0])
  assert.deepEqual(orders[2], orders[0])
})

test('receipts: per device, the greatest wins, never back; unread counts and readers', () => {
  const [a, b] = pair()
  let now = 100
  const ada = new ChatRoom(a, { user: 'ada', device: 'd1', now: () => now++ })
  const bobPhone = new ChatRoom(b, { user: 'bob', device: 'phone', now: () => now++ })
  const m1 = ada.send('one')
  const m2 = ada.send('two')
  const m3 = ada.send('three')
  assert.equal(bobPhone.unreadCount(), 3)
  assert.equal(ada.unreadCount(), 0, 'one\'s own messages are never unread')
  assert.ok(bobPhone.markRead(m3))
  const laptop = new ChatRoom(a, { user: 'bob', device: 'laptop', now: () => now++ })
  assert.equal(laptop.markRead(m1), false, 'bob has read further already')
  assert.equal(bobPhone.receipt('bob').message, m3)
  assert.equal(bobPhone.unreadCount(), 0)
  assert.deepEqual(ada.readBy(ada.message(m2).sort), ['bob'])
  assert.deepEqual(ada.readBy(ada.message(m2).sort).includes('ada'), false)
  assert.equal(b.getMap('receipts').get('bob/phone').sort, ada.message(m3).sort)
  assert.throws(() => ada.markRead('missing'), ChatError)
  assert.throws(() => new ChatRoom(a, { user: 'x', device: 'a/b' }), ChatError)
})

test('the clock follows stamps of messages that arrive', () => {
  const [a, b] = pair()
  const ada = new ChatRoom(a, { user: 'ada', device: 'd', now: () => 9_000_000 })
  const bob = new ChatRoom(b, { user: 'bob', device: 'd', now: () => 1 })
  ada.send('from the future')
  const reply = bob.send('reply')
  assert.equal(bob.messages().at(-1).id, reply, 'a reply sorts after what its writer saw')
  // A replica that loads an existing room starts above its stamps.
  const c = new Y.Doc()
  Y.applyUpdate(c, Y.encodeStateAsUpdate(a))
  const carol = new ChatRoom(c, { user: 'carol', device: 'd', now: () => 1 })
  assert.ok(hlcKey(carol.clock.last()) >= bob.message(reply).hlc)
})

test('onChange hears local and remote changes until stopped', () => {
  const [a, b] = pair()
  const ada = new ChatRoom(a, { user: 'ada', device: 'd' })
  const bob = new ChatRoom(b, { user: 'bob', device: 'd' })
  let heard = 0
  const stop = ada.onChange(() => heard++)
  const id = bob.send('hi')
  ada.markRead(id)
  assert.ok(heard >= 2)
  stop()
  const before = heard
  bob.send('again')
  assert.equal(heard, before)
})

test('kinds, metadata, attachments, replies: written as the schema says, read back', () => {
  const [a, b] = pair()
  const ada = new ChatRoom(a, { user: 'ada', device: 'd' })
  const bob = new ChatRoom(b, { user: 'bob', device: 'd' })
  const question = ada.send('which one?')
  const photo = { url: 'https://cdn.example/cat.png', mime: 'image/png', size: 48213, width: 800, height: 600 }
  const id = bob.send('this one', { kind: 'image', meta: { caption: 'Tom' }, attachments: [photo], replyTo: question })
  const seen = ada.message(id)
  assert.equal(seen.kind, 'image')
  assert.deepEqual(seen.meta, { caption: 'Tom' })
  assert.deepEqual(seen.attachments, [photo])
  assert.equal(seen.replyTo, question)
  assert.equal(ada.message(question).kind, 'text')
  assert.equal(a.getMap('messages').get(question).has('kind'), false, 'a text message carries no kind')
  assert.throws(() => ada.send('x', { kind: 'system' }), ChatError)
  assert.throws(() => ada.send('x', { kind: 'sticker' }), ChatError)
  assert.throws(() => ada.send('x', { attachments: [{ url: '', mime: 'image/png', size: 1 }] }), ChatError)
  assert.throws(() => ada.send('x', { attachments: [{ url: 'https://x', mime: 'png', size: 1 }] }), ChatError)
  assert.throws(() => ada.send('x', { replyTo: 'a/b' }), ChatError)
})

test('reactions: one per user and emoji, taken back by their user', () => {
  const [a, b] = pair()
  const ada = new ChatRoom(a, { user: 'ada', device: 'd' })
  const bob = new ChatRoom(b, { user: 'bob', device: 'd' })
  const id = ada.send('party?')
  assert.ok(bob.react(id, '🎉'))
  assert.equal(bob.react(id, '🎉'), false, 'already there')
  assert.ok(ada.react(id, '🎉'))
  assert.ok(ada.react(id, '👍'))
  assert.deepEqual([...ada.reactions().get(id)], [['🎉', ['ada', 'bob']], ['👍', ['ada']]])
  assert.ok(ada.react(id, '👍', false))
  assert.deepEqual([...bob.reactions().get(id).keys()], ['🎉'])
  assert.equal(b.getMap('reactions').has(`${id}/🎉/bob`), true)
  assert.throws(() => ada.react(id, 'a b'), ChatError)
  assert.throws(() => ada.react('missing', '👍'), ChatError)
})

test('delivery receipts: per device, forward only; delivered to readers too', () => {
  const [a, b] = pair()
  const ada = new ChatRoom(a, { user: 'ada', device: 'd' })
  const bob = new ChatRoom(b, { user: 'bob', device: 'phone' })
  const m1 = ada.send('one')
  const m2 = ada.send('two')
  assert.deepEqual(ada.deliveredTo(ada.message(m1)), [])
  assert.ok(bob.markAllDelivered())
  assert.equal(bob.markAllDelivered(), false)
  assert.equal(bob.markDelivered(m1), false, 'never back')
  assert.deepEqual(ada.deliveredTo(ada.message(m1)), ['bob'])
  assert.deepEqual(ada.deliveredTo(ada.message(m2)), ['bob'])
  assert.equal(ada.markAllDelivered(), false, 'nothing of others to have')
  const carol = new ChatRoom(a, { user: 'carol', device: 'x' })
  carol.markRead(m1)
  assert.deepEqual(ada.deliveredTo(ada.message(m1)), ['bob', 'carol'])
  assert.equal(b.getMap('delivered').get('bob/phone').message, m2)
})

test('membership: each user joins and leaves for themselves; system messages never count as unread', () => {
  const [a, b] = pair()
  let t = 1_000
  const ada = new ChatRoom(a, { user: 'ada', device: 'd', now: () => t })
  const bob = new ChatRoom(b, { user: 'bob', device: 'd', now: () => t })
  assert.ok(ada.join())
  assert.equal(ada.join(), false, 'a member already')
  t = 2_000
  assert.ok(bob.join())
  assert.deepEqual(bob.members(), [
    { user: 'ada', joined: true, at: 1_000 },
    { user: 'bob', joined: true, at: 2_000 },
  ])
  assert.deepEqual(a.getMap('members').get('bob'), { state: 'joined', at: 2_000 })
  // A system message, as the server writes it: not unread for anyone.
  const id = uuidv7(t)
  a.transact(() => {
    const fields = new Y.Map()
    a.getMap('messages').set(id, fields)
    const hlc = { wall: t, counter: 0 }
    for (const [k, v] of Object.entries({
      id, author: 'bob', device: 'server', client: 7, text: 'bob joined', created: t,
      hlc: hlcKey(hlc), sort: sortKey(hlc, 7, id), kind: 'system',
    })) fields.set(k, v)
  })
  assert.equal(ada.unreadCount(), 0)
  assert.equal(bob.messages()[0].kind, 'system')
  t = 3_000
  assert.ok(ada.leave())
  assert.equal(bob.isMember('ada'), false)
  assert.equal(ada.leave(), false)
})
