// The driftsync bindings from Kotlin on the JVM, against a running server (run by
// ffi/tests/kotlin.rs; the environment is the Python scenario's, see ffi/tests/python/scenario.py).
// Everything runs on one thread (runBlocking): a call that blocked it would stall the ticker.

import java.io.File
import java.util.Collections
import kotlinx.coroutines.delay
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import uniffi.driftsync.*

val env: Map<String, String> = System.getenv()
val url = env.getValue("DRIFTSYNC_URL")
val dir = env.getValue("DRIFTSYNC_DIR")
const val ROOM = "chat/general"
const val NOTES = "notes/1"
var passed = 0

class Tokens(private val value: String) : TokenProvider {
    override fun token(): String = value
}

class Recorder : EventListener {
    val events: MutableList<Event> = Collections.synchronizedList(mutableListOf())
    val threads: MutableSet<Long> = Collections.synchronizedSet(mutableSetOf())

    override fun onEvent(event: Event) {
        events.add(event)
        threads.add(Thread.currentThread().id)
    }

    fun seen(pick: (Event) -> Boolean): Boolean = synchronized(events) { events.any(pick) }
}

suspend fun until(what: String, check: suspend () -> Boolean) {
    val deadline = System.nanoTime() + 20_000_000_000L
    while (System.nanoTime() < deadline) {
        if (check()) return
        delay(20)
    }
    throw AssertionError("timed out waiting for $what")
}

fun ok(name: String) {
    passed += 1
    println("ok: $name")
}

fun check(condition: Boolean, what: () -> String) {
    if (!condition) throw AssertionError(what())
}

fun config(server: String, vararg docs: String) = SessionConfig(server, docs.toList(), null)

suspend fun scenario() = coroutineScopeWithTicker { ticker ->
    val ada = Store.open("$dir/kt-ada.db", "ada")
    val bob = Store.open("$dir/kt-bob.db", "bob")
    val first = ada.chatSend(ROOM, "written offline (kotlin)")
    check(ada.chatList(ROOM).single().delivery == Delivery.LOCAL) { "not local" }
    ok("offline write")

    val adaEvents = Recorder()
    val bobEvents = Recorder()
    val sa = ada.startSession(config(url, ROOM, NOTES), Tokens(env.getValue("DRIFTSYNC_TOKEN_ADA")))
    val sb = bob.startSession(config(url, ROOM, NOTES), Tokens(env.getValue("DRIFTSYNC_TOKEN_BOB")))
    sa.addListener(adaEvents)
    val subB = sb.addListener(bobEvents)
    until("both synced") { sa.state() == ConnectionState.SYNCED && sb.state() == ConnectionState.SYNCED }
    until("the offline message at bob") { bob.chatList(ROOM).any { it.id == first } }
    until("bob's device has it") { ada.chatList(ROOM).single().delivery == Delivery.DELIVERED }
    check(ada.chatList(ROOM).single().deliveredTo == listOf("bob")) { "not delivered to bob" }
    ok("sessions synced; the offline message stored and delivered")

    val hi = ada.chatSend(ROOM, "hi bob")
    until("bob gets hi") { bobEvents.seen { it is Event.MessageAdded && it.message.id == hi } }
    val reply = bob.chatSend(ROOM, "hi ada")
    until("ada gets the reply") {
        adaEvents.seen { it is Event.MessageAdded && it.message.id == reply && it.message.author == "bob" }
    }
    ada.chatEdit(ROOM, hi, "hi bob (edited)")
    until("bob sees the edit") {
        bobEvents.seen { it is Event.MessageChanged && it.message.id == hi && it.message.text == "hi bob (edited)" }
    }
    bob.chatMarkRead(ROOM, null)
    until("ada sees bob's receipt") {
        adaEvents.seen { it is Event.MessageChanged && it.message.id == hi && "bob" in it.message.readBy }
    }
    ok("chat: send, edit, read receipts")

    bob.textAppend(NOTES, "bob wrote")
    until("ada's text") { ada.text(NOTES) == "bob wrote" }
    until("ada told the notes changed") { adaEvents.seen { it is Event.DocumentChanged && it.doc == NOTES } }
    ok("text")

    sa.pause()
    check(sa.state() == ConnectionState.PAUSED) { "not paused: ${sa.state()}" }
    val paused = ada.chatSend(ROOM, "sent while paused")
    ada.textAppend(NOTES, " +ada")
    delay(500)
    check(!bobEvents.seen { it is Event.MessageAdded && it.message.id == paused }) { "paused, yet sent" }
    sa.resume()
    until("bob gets the paused message") { bobEvents.seen { it is Event.MessageAdded && it.message.id == paused } }
    until("texts converge") { bob.text(NOTES) == "bob wrote +ada" }
    until("ada synced again") { sa.state() == ConnectionState.SYNCED }
    check(ada.chatList(ROOM).map { it.id } == bob.chatList(ROOM).map { it.id }) { "different orders" }
    ok("pause, write, resume, converge")

    val eve = Store.open("$dir/kt-eve.db", "eve")
    eve.chatSend(ROOM, "eve")
    try {
        eve.syncOnce(url, "not-a-token", null)
        throw AssertionError("a bad token synced")
    } catch (e: DriftsyncException.Unauthorized) {
        println("  refused token: ${e.reason}")
    }
    try {
        eve.syncOnce(env.getValue("DRIFTSYNC_DEAD_URL"), "", null)
        throw AssertionError("a dead server synced")
    } catch (e: DriftsyncException.Unreachable) {
        println("  unreachable: ${e.reason}")
    }
    val eveEvents = Recorder()
    val se = eve.startSession(config(url, ROOM), Tokens("not-a-token"))
    se.addListener(eveEvents)
    until("eve told unauthorized") { eveEvents.seen { it is Event.Error && it.kind == ErrorKind.UNAUTHORIZED } }
    se.shutdown()
    ok("typed errors: unauthorized, unreachable")

    val carol = Store.open("$dir/kt-carol.db", "carol")
    carol.chatSend(ROOM, "over TLS")
    try {
        carol.syncOnce(env.getValue("DRIFTSYNC_TLS_URL"), "", null)
        throw AssertionError("an untrusted certificate was accepted")
    } catch (e: DriftsyncException.Tls) {
        println("  untrusted: ${e.reason}")
    }
    val ca = File(env.getValue("DRIFTSYNC_TLS_CA")).readText()
    carol.syncOnce(env.getValue("DRIFTSYNC_TLS_URL"), "", ca)
    check(carol.chatList(ROOM).single().delivery == Delivery.ACKNOWLEDGED) { "not acknowledged over TLS" }
    ok("wss:// with an extra CA")

    check(Thread.currentThread().id !in adaEvents.threads) { "a listener ran on the caller's thread" }
    subB.cancel()
    sa.shutdown()
    sb.shutdown()
    check(sa.state() == ConnectionState.STOPPED) { "not stopped" }
    ok("listener threads, cancel, shutdown")

    println("  longest stall: ${ticker.longest / 1_000_000} ms")
    check(ticker.longest < 1_000_000_000L) { "the thread stalled for ${ticker.longest / 1_000_000} ms" }
    ok("nothing blocked the caller's thread")
}

class Ticker {
    @Volatile var running = true
    var longest = 0L
}

suspend fun coroutineScopeWithTicker(body: suspend (Ticker) -> Unit) = kotlinx.coroutines.coroutineScope {
    val ticker = Ticker()
    val job = launch {
        var last = System.nanoTime()
        while (ticker.running) {
            delay(10)
            val now = System.nanoTime()
            ticker.longest = maxOf(ticker.longest, now - last)
            last = now
        }
    }
    try {
        body(ticker)
    } finally {
        ticker.running = false
        job.join()
    }
}

fun main() {
    try {
        runBlocking { scenario() }
    } catch (e: Throwable) {
        e.printStackTrace()
        println("$passed passed, 1 failed")
        System.exit(1)
    }
    println("$passed passed, 0 failed")
    // The library's threads are not daemons of the JVM's: leave now.
    System.exit(0)
}
