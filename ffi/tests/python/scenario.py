"""The driftsync bindings from Python, against a running server (run by ffi/tests/bindings.rs).

Environment: DRIFTSYNC_URL (ws://127.0.0.1:PORT, a server with a secret), DRIFTSYNC_TOKEN_ADA,
DRIFTSYNC_TOKEN_BOB (valid tokens), DRIFTSYNC_DEAD_URL (nothing listens there), DRIFTSYNC_TLS_URL
(wss://…, a server with a self-signed certificate) and DRIFTSYNC_TLS_CA (that certificate, PEM),
DRIFTSYNC_DIR (a scratch directory). Prints one line per step and "N passed, 0 failed" at the end.
"""

import asyncio
import json
import os
import sys
import threading
import time

from driftsync import (
    ConnectionState,
    Delivery,
    DriftsyncError,
    ErrorKind,
    Event,
    EventListener,
    SessionConfig,
    Store,
    TokenProvider,
)

URL = os.environ["DRIFTSYNC_URL"]
DIR = os.environ["DRIFTSYNC_DIR"]
STEP = 20.0  # seconds a step may take: generous, nothing here is a timing assertion
ROOM = "chat/general"
NOTES = "notes/1"
passed = 0
RECORDERS = []  # printed when a wait times out


class Tokens(TokenProvider):
    def __init__(self, token):
        self.token_value = token
        self.asked = 0

    def token(self):
        self.asked += 1
        return self.token_value


class Recorder(EventListener):
    """Keeps every event; called on the library's event thread."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()
        self.threads = set()

    def on_event(self, event):
        with self.lock:
            self.events.append(event)
            self.threads.add(threading.get_ident())

    def seen(self, pick):
        with self.lock:
            return [e for e in self.events if pick(e)]


async def until(what, check):
    deadline = time.monotonic() + STEP
    while time.monotonic() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    for recorder in RECORDERS:
        print([str(e) for e in recorder.events])
    raise AssertionError(f"timed out waiting for {what}")


def ok(name):
    global passed
    passed += 1
    print(f"ok: {name}", flush=True)


class Ticker:
    """Proves nothing blocks the event loop: the longest gap between 10 ms ticks."""

    def __init__(self):
        self.longest = 0.0
        self.running = True

    async def run(self):
        last = time.monotonic()
        while self.running:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now


async def main():
    ticker = Ticker()
    tick_task = asyncio.create_task(ticker.run())

    ada = await Store.open(os.path.join(DIR, "ada.db"), "ada")
    bob = await Store.open(os.path.join(DIR, "bob.db"), "bob")
    assert ada.user() == "ada"
    # Offline first: written before any session exists.
    first = await ada.chat_send(ROOM, "written offline")
    [m] = await ada.chat_list(ROOM)
    assert m.id == first and m.delivery == Delivery.LOCAL, m
    ok("offline write")

    ada_events, bob_events = Recorder(), Recorder()
    ada_tokens = Tokens(os.environ["DRIFTSYNC_TOKEN_ADA"])
    config = SessionConfig(server_url=URL, documents=[ROOM, NOTES], ca_certificate_pem=None)
    sa = await ada.start_session(config, ada_tokens)
    sb = await bob.start_session(config, Tokens(os.environ["DRIFTSYNC_TOKEN_BOB"]))
    sub_a = sa.add_listener(ada_events)
    sub_b = sb.add_listener(bob_events)
    RECORDERS.extend([ada_events, bob_events])
    await until("both synced", lambda: sa.state() == ConnectionState.SYNCED and sb.state() == ConnectionState.SYNCED)
    assert ada_tokens.asked >= 1
    await until("ada's offline message at bob", lambda: _has(bob.chat_list(ROOM), "written offline"))
    await until("bob's device has it", lambda: _delivery(ada.chat_list(ROOM), first, Delivery.DELIVERED))
    [m] = await ada.chat_list(ROOM)
    assert m.delivered_to == ["bob"] and m.kind == "text", m
    ok("sessions synced; the offline message stored and delivered")

    # Chat both ways, live.
    hi = await ada.chat_send(ROOM, "hi bob")
    await until("bob gets hi", lambda: bob_events.seen(lambda e: e.is_MESSAGE_ADDED() and e.message.id == hi))
    reply = await bob.chat_send(ROOM, "hi ada")
    await until("ada gets the reply", lambda: ada_events.seen(
        lambda e: e.is_MESSAGE_ADDED() and e.message.id == reply and e.message.author == "bob"))
    await ada.chat_edit(ROOM, hi, "hi bob (edited)")
    await until("bob sees the edit", lambda: bob_events.seen(
        lambda e: e.is_MESSAGE_CHANGED() and e.message.id == hi and e.message.text == "hi bob (edited)"))
    await bob.chat_mark_read(ROOM, None)
    await until("ada sees bob's receipt", lambda: ada_events.seen(
        lambda e: e.is_MESSAGE_CHANGED() and e.message.id == hi and "bob" in e.message.read_by))
    answer = await bob.chat_reply(ROOM, hi, "a reply")
    await until("ada gets the reply's reply_to", lambda: ada_events.seen(
        lambda e: e.is_MESSAGE_ADDED() and e.message.id == answer and e.message.reply_to == hi))
    assert await ada.chat_react(ROOM, answer, "👍", True)
    await until("bob sees the reaction", lambda: bob_events.seen(
        lambda e: e.is_MESSAGE_CHANGED() and e.message.id == answer and e.message.reactions == {"👍": ["ada"]}))
    await ada.chat_delete(ROOM, first)
    await until("bob sees the deletion", lambda: bob_events.seen(
        lambda e: e.is_MESSAGE_CHANGED() and e.message.id == first and e.message.deleted))
    assert await bob.chat_unread_count(ROOM) == 0
    ok("chat: send, edit, read receipts, reply, reaction, delete")

    # Text and map.
    await bob.text_append(NOTES, "bob wrote")
    await until("ada's text", lambda: _eq(ada.text(NOTES), "bob wrote"))
    await until("ada told the notes changed", lambda: ada_events.seen(lambda e: e.is_DOCUMENT_CHANGED() and e.doc == NOTES))
    await ada.text_insert(NOTES, 0, "> ")
    await ada.map_set(NOTES, "title", json.dumps({"t": "Notes", "n": 1}))
    await until("bob's text", lambda: _eq(bob.text(NOTES), "> bob wrote"))
    await until("bob's map", lambda: _eq(bob.map_entries(NOTES), {"title": '{"n":1,"t":"Notes"}'}))
    ok("text and map")

    # Presence and typing.
    await sa.set_presence(ROOM, json.dumps({"name": "Ada"}))
    await until("bob sees ada's presence", lambda: bob_events.seen(
        lambda e: e.is_PRESENCE() and e.user == "ada" and e.state_json and "Ada" in e.state_json))
    await sa.keystroke(ROOM)
    await until("bob sees ada typing", lambda: bob_events.seen(lambda e: e.is_TYPING() and e.user == "ada" and e.typing))
    await sa.stop_typing(ROOM)
    await until("bob sees ada stop", lambda: bob_events.seen(lambda e: e.is_TYPING() and e.user == "ada" and not e.typing))
    ok("presence and typing")

    # Pause, write while paused, resume: converges.
    await sa.pause()
    assert sa.state() == ConnectionState.PAUSED, sa.state()
    await until("ada's listener told paused", lambda: ada_events.seen(
        lambda e: e.is_STATE_CHANGED() and e.state == ConnectionState.PAUSED))
    paused_id = await ada.chat_send(ROOM, "sent while paused")
    await ada.text_append(NOTES, " +ada")
    await asyncio.sleep(0.5)
    assert not bob_events.seen(lambda e: e.is_MESSAGE_ADDED() and e.message.id == paused_id), "paused, yet sent"
    mine = [m for m in await ada.chat_list(ROOM) if m.id == paused_id]
    assert mine and mine[0].delivery == Delivery.LOCAL, mine
    await sa.resume()
    await until("bob gets the paused message", lambda: bob_events.seen(
        lambda e: e.is_MESSAGE_ADDED() and e.message.id == paused_id))
    await until("texts converge", lambda: _eq(bob.text(NOTES), "> bob wrote +ada"))
    await until("ada synced again", lambda: sa.state() == ConnectionState.SYNCED)
    assert [m.id for m in await ada.chat_list(ROOM)] == [m.id for m in await bob.chat_list(ROOM)]
    assert await ada.text(NOTES) == await bob.text(NOTES)
    ok("pause, write, resume, converge")

    # Membership and the inbox: a fresh device finds the room, with its unread count, from its
    # token alone, before downloading it.
    assert await ada.chat_join(ROOM)
    assert await bob.chat_join(ROOM)
    assert not await bob.chat_join(ROOM), "a member already"
    await until("the joins announced", lambda: _has(bob.chat_list(ROOM), "ada joined"))
    assert [(m.user, m.joined) for m in await bob.chat_members(ROOM)] == [("ada", True), ("bob", True)]
    await bob.chat_send(ROOM, "news for ada")
    fresh = await Store.open(os.path.join(DIR, "ada-new.db"), "ada")

    async def _inbox_lists_the_news():
        inbox = await fresh.fetch_inbox(URL, os.environ["DRIFTSYNC_TOKEN_ADA"], 0, None)
        return [(r.room, r.last_text, r.last_author) for r in inbox.rooms] == [(ROOM, "news for ada", "bob")] and \
            inbox.rooms[0].unread >= 1 and inbox.version > 0

    await until("the fresh device's inbox", _inbox_lists_the_news)
    ok("membership and the inbox")

    # Typed errors: a refused token, an unreachable server, an invalid argument.
    eve = await Store.open(os.path.join(DIR, "eve.db"), "eve")
    await eve.chat_send(ROOM, "eve")
    try:
        await eve.sync_once(URL, "not-a-token", None)
        raise AssertionError("a bad token synced")
    except DriftsyncError.Unauthorized as e:
        print(f"  refused token: {e}")
    try:
        await eve.sync_once(os.environ["DRIFTSYNC_DEAD_URL"], "", None)
        raise AssertionError("a dead server synced")
    except DriftsyncError.Unreachable as e:
        print(f"  unreachable: {e}")
    try:
        await eve.chat_edit(ROOM, "no-such-message", "x")
        raise AssertionError("edited a missing message")
    except DriftsyncError.Invalid:
        pass
    eve_events = Recorder()
    se = await eve.start_session(SessionConfig(server_url=URL, documents=[ROOM], ca_certificate_pem=None),
                                 Tokens("not-a-token"))
    se.add_listener(eve_events)
    await until("eve's session told unauthorized", lambda: eve_events.seen(
        lambda e: e.is_ERROR() and e.kind == ErrorKind.UNAUTHORIZED))
    await se.shutdown()
    dead_events = Recorder()
    dead = await Store.open(os.path.join(DIR, "dead.db"), "dead")
    sd = await dead.start_session(SessionConfig(server_url=os.environ["DRIFTSYNC_DEAD_URL"], documents=[ROOM],
                                                ca_certificate_pem=None), Tokens(""))
    sd.add_listener(dead_events)
    await until("unreachable told", lambda: dead_events.seen(lambda e: e.is_ERROR() and e.kind == ErrorKind.UNREACHABLE))
    await sd.shutdown()
    ok("typed errors: unauthorized, unreachable, invalid")

    # TLS: a self-signed server, trusted through its certificate; untrusted without it.
    tls_url, ca = os.environ["DRIFTSYNC_TLS_URL"], open(os.environ["DRIFTSYNC_TLS_CA"]).read()
    carol = await Store.open(os.path.join(DIR, "carol.db"), "carol")
    await carol.chat_send(ROOM, "over TLS")
    try:
        await carol.sync_once(tls_url, "", None)
        raise AssertionError("an untrusted certificate was accepted")
    except DriftsyncError.Tls as e:
        print(f"  untrusted: {e}")
    report = await carol.sync_once(tls_url, "", ca)
    assert report.documents >= 1 and report.refused == [], report
    [m] = await carol.chat_list(ROOM)
    assert m.delivery == Delivery.ACKNOWLEDGED, m  # stored; nobody else in that room
    ok("wss:// with an extra CA; a clear TLS error without it")

    # Listeners: on a thread of their own, never the caller's; cancel stops them.
    assert threading.get_ident() not in ada_events.threads
    sub_b.cancel()
    assert sub_b.is_cancelled()
    await asyncio.sleep(0.2)
    count = len(bob_events.events)
    await ada.chat_send(ROOM, "after cancel")
    await asyncio.sleep(1.0)
    assert len(bob_events.events) == count, "events after cancel"
    await sa.shutdown()
    await sb.shutdown()
    assert sa.state() == ConnectionState.STOPPED
    await until("stopped told", lambda: ada_events.seen(
        lambda e: e.is_STATE_CHANGED() and e.state == ConnectionState.STOPPED))
    # The store works on after its session stopped.
    await ada.chat_send(ROOM, "offline again")
    sub_a.cancel()
    ok("listener threads, cancel, shutdown")

    ticker.running = False
    await tick_task
    print(f"  longest event-loop stall: {ticker.longest * 1000:.0f} ms")
    assert ticker.longest < 1.0, f"the event loop stalled for {ticker.longest:.2f} s"
    ok("nothing blocked the event loop")


async def _eq(coro, expected):
    return (await coro) == expected


async def _delivery(messages, id, state):
    return any(m.id == id and m.delivery == state for m in await messages)


async def _has(messages, text):
    return any(m.text == text for m in await messages)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"{passed} passed, 1 failed")
        sys.exit(1)
    print(f"{passed} passed, 0 failed")
