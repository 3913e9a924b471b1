#!/usr/bin/env node
// A small foliosync client: shows a watchlist, or adds symbols to it, through a relay.
//
//   node foliosync.mjs --server ws://127.0.0.1:8765/ws --token TOKEN show Tech [--json]
//   node foliosync.mjs --server ws://127.0.0.1:8765/ws --token TOKEN add Tech AAPL MSFT [--note TEXT]
//
// Each run is one connection: Hello, the index and the watchlist synced from an empty state,
// the edit sent, its Acks awaited, goodbye. Written from PROTOCOL.md alone.

import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";
import * as Y from "yjs";

import { HybridClock, INDEX_ID, UserIndex, Watchlist, normalizeName, normalizeSymbol } from "./documents.mjs";
import { Connection, RelayError } from "./protocol.mjs";

const USAGE = `usage: foliosync.mjs --server URL --token TOKEN [--device ID] [--timeout SECONDS]
                     (show NAME [--json] | add NAME SYMBOL... [--note TEXT] [--json])`;

class UsageError extends Error {}

/** The device id written into this device's keys: --device, else the token's "dev" claim. */
function deviceOf(token, given) {
  if (given) return given;
  try {
    const claims = JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString("utf8"));
    if (typeof claims.dev === "string" && claims.dev) return claims.dev;
  } catch {
    // not a JWT we can read: the relay will say what is wrong with it
  }
  return randomBytes(8).toString("hex");
}

/** What `doc` holds that a peer with `stateVector` lacks, or null if nothing (by their clocks). */
function whatPeerLacks(doc, stateVector) {
  const theirs = Y.decodeStateVector(stateVector);
  for (const [client, clock] of Y.decodeStateVector(Y.encodeStateVector(doc))) {
    if ((theirs.get(client) ?? 0) < clock) return Y.encodeStateAsUpdate(doc, stateVector);
  }
  return null;
}

class Session {
  constructor(connection, timeoutMs) {
    this.connection = connection;
    this.timeoutMs = timeoutMs;
    this.docs = new Map();
    this.replied = new Set();
    this.inFlight = new Map(); // doc -> highest seq sent and not yet acknowledged
    this.errors = [];
    connection.listen((frame) => this.#onFrame(frame));
  }

  #onFrame(frame) {
    const doc = this.docs.get(frame.doc);
    switch (frame.type) {
      case "SyncReply": {
        if (!doc) return;
        Y.applyUpdate(doc, frame.update, "relay");
        const missing = whatPeerLacks(doc, frame.state_vector);
        if (missing) this.inFlight.set(frame.doc, this.connection.update(frame.doc, missing));
        this.replied.add(frame.doc);
        return;
      }
      case "Update": // another device's change (PROTOCOL.md 4.3: it may precede the SyncReply)
        if (doc) Y.applyUpdate(doc, frame.update, "relay");
        return;
      case "Ack":
        if ((this.inFlight.get(frame.doc) ?? 0) <= frame.seq) this.inFlight.delete(frame.doc);
        return;
      case "Error": // per document (a fatal one fails the connection itself)
        this.errors.push(new RelayError(frame));
        return;
      default: // prices and Published: not asked for
    }
  }

  /** A Y.Doc of `id`, synced from nothing; local changes go to the relay as they are made. */
  async sync(id) {
    const doc = new Y.Doc();
    this.docs.set(id, doc);
    doc.on("update", (update, origin) => {
      if (origin === "local") this.inFlight.set(id, this.connection.update(id, update));
    });
    this.connection.syncRequest(id, Y.encodeStateVector(doc));
    await this.until(() => this.replied.has(id));
    return doc;
  }

  async until(check) {
    await this.connection.until(() => this.errors.length > 0 || check(), this.timeoutMs);
    if (this.errors.length > 0) throw this.errors[0];
  }

  async settled() {
    await this.until(() => this.inFlight.size === 0);
  }
}

function print(watchlist, id, json, added) {
  const entries = watchlist.entries();
  if (json) {
    const out = { id, name: watchlist.name, symbols: entries.map(({ symbol, note }) => ({ symbol, note })) };
    if (added) out.added = added;
    console.log(JSON.stringify(out));
  } else if (added) {
    console.log(added.length ? `added ${added.join(" ")} to ${watchlist.name}` : "nothing new to add");
  } else {
    for (const { symbol, note } of entries) console.log(note ? `${symbol}\t${note}` : symbol);
  }
}

async function main(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      server: { type: "string" },
      token: { type: "string" },
      device: { type: "string" },
      timeout: { type: "string", default: "10" },
      note: { type: "string" },
      json: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const [command, name, ...symbols] = positionals;
  if (!values.server || !values.token || !name || !["show", "add"].includes(command)) throw new UsageError(USAGE);
  if (command === "add" && symbols.length === 0) throw new UsageError("add needs at least one symbol");
  if (command === "show" && symbols.length > 0) throw new UsageError("show takes one name");
  const displayName = normalizeName(name);
  const wanted = symbols.map(normalizeSymbol); // bad input is refused before connecting
  const timeoutMs = Number(values.timeout) * 1000;
  if (!(timeoutMs > 0)) throw new UsageError("--timeout must be a positive number of seconds");

  const clock = new HybridClock();
  const device = deviceOf(values.token, values.device);
  const connection = await Connection.open(values.server, values.token, { timeoutMs });
  try {
    const session = new Session(connection, timeoutMs);
    const index = new UserIndex(await session.sync(INDEX_ID), clock);
    const id = index.find("watchlist", displayName);
    const watchlist = new Watchlist(await session.sync(id), device, clock);
    if (command === "show") {
      if (!watchlist.exists) {
        console.error(`no watchlist named ${JSON.stringify(displayName)}`);
        return 1;
      }
      print(watchlist, id, values.json);
      return 0;
    }
    if (!watchlist.exists) {
      watchlist.initialize(displayName);
      index.register(id, "watchlist", displayName);
    }
    const added = watchlist.add(wanted, values.note ?? null);
    await session.settled();
    print(watchlist, id, values.json, added);
    return 0;
  } finally {
    connection.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (exc) => {
    console.error(`foliosync: ${exc.message}`);
    process.exitCode = exc instanceof UsageError || exc.message.startsWith("invalid symbol") || exc.message.startsWith("a name") ? 2 : 1;
  },
);
