"""A small chat client on the driftsync Python bindings (README: "Phones and other languages").

    PYTHONPATH=target/bindings/python python3 bindings/examples/chat.py ada "hello from Python"

Sends a message to chat/general, prints what arrives for a few seconds, lists the room and marks
it read. DRIFTSYNC_SERVER (default ws://127.0.0.1:8787) and DRIFTSYNC_TOKEN (default: none, an
open server) say where and as whom.
"""

import asyncio
import os
import sys

from driftsync import EventListener, SessionConfig, Store, TokenProvider


class Tokens(TokenProvider):
    def token(self):
        # Asked before every connection attempt: fetch a fresh one from your backend here.
        return os.environ.get("DRIFTSYNC_TOKEN", "")


class Printer(EventListener):
    def on_event(self, event):  # called on the library's event thread
        if event.is_MESSAGE_ADDED():
            print(f"  {event.message.author}: {event.message.text}")
        elif event.is_STATE_CHANGED():
            print(f"  [{event.state.name.lower()}]")
        elif event.is_ERROR():
            print(f"  [{event.kind.name.lower()}: {event.message}]")


async def main(user, text):
    store = await Store.open(f"{user}.db", user)
    config = SessionConfig(
        server_url=os.environ.get("DRIFTSYNC_SERVER", "ws://127.0.0.1:8787"),
        documents=["chat/general"],
        ca_certificate_pem=None,
    )
    session = await store.start_session(config, Tokens())
    subscription = session.add_listener(Printer())
    await store.chat_send("chat/general", text)  # stored at once, sent when connected
    await asyncio.sleep(3)
    for m in await store.chat_list("chat/general"):
        print(f"{m.author}: {m.text} ({m.delivery.name.lower()}, read by {m.read_by})")
    await store.chat_mark_read("chat/general", None)
    subscription.cancel()
    await session.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ada", sys.argv[2] if len(sys.argv) > 2 else "hello"))
