// The foliosync wire protocol, version 1, from PROTOCOL.md sections 1, 3 and 4: frames as msgpack
// arrays [type, ...fields], one per binary WebSocket message, and a connection that keeps the
// sequence rules (a document's SyncRequest before its Updates, strictly increasing seqs).

import { decode, encode } from "@msgpack/msgpack";
import WebSocket from "ws";

export const PROTOCOL_VERSION = 1;

// Type codes and field names, in wire order (PROTOCOL.md, section 3).
const FRAMES = {
  1: ["Hello", "protocol", "token", "client_name"],
  2: ["Welcome", "protocol", "user", "device", "server_time_ms", "documents"],
  3: ["Error", "code", "message", "doc", "seq"],
  4: ["Ping", "nonce"],
  5: ["Pong", "nonce"],
  10: ["SyncRequest", "doc", "state_vector"],
  11: ["SyncReply", "doc", "update", "state_vector", "changed_at_ms", "changed_by"],
  12: ["Update", "doc", "seq", "update", "changed_at_ms", "changed_by"],
  13: ["Ack", "doc", "seq"],
  40: ["Subscribe", "symbols"],
  41: ["Resync", "symbols"],
  42: ["PriceSnapshot", "ticks"],
  43: ["PriceBatch", "ticks"],
  44: ["Publish", "batch", "ticks"],
  45: ["Published", "batch", "accepted", "rejected"],
};
const CODES = Object.fromEntries(Object.entries(FRAMES).map(([code, [name]]) => [name, Number(code)]));

/** A frame the peer sent that is not one of protocol version 1. */
export class ProtocolError extends Error {
  constructor(message, code = "bad_frame") {
    super(message);
    this.code = code;
  }
}

/** An Error frame received from the relay; fatal when it names no document. */
export class RelayError extends Error {
  constructor(frame) {
    super(`${frame.code}: ${frame.message}${frame.doc ? ` (${frame.doc})` : ""}`);
    this.code = frame.code;
    this.doc = frame.doc;
    this.seq = frame.seq;
    this.fatal = frame.doc === null || frame.doc === undefined;
  }
}

/** The bytes of one frame: `fields` in wire order, null for an absent optional field. */
export function encodeFrame(type, ...fields) {
  const code = CODES[type];
  if (code === undefined) throw new TypeError(`unknown frame type ${type}`);
  if (fields.length !== FRAMES[code].length - 1) {
    throw new TypeError(`${type} has ${FRAMES[code].length - 1} fields, not ${fields.length}`);
  }
  return encode([code, ...fields]);
}

/** One message from the relay as {type, ...fields}; ProtocolError for anything else. */
export function decodeFrame(data) {
  let items;
  try {
    items = decode(data);
  } catch (exc) {
    throw new ProtocolError(`not a msgpack message: ${exc.message}`);
  }
  if (!Array.isArray(items) || items.length === 0 || !Number.isInteger(items[0])) {
    throw new ProtocolError("a frame is a non-empty msgpack array starting with its type");
  }
  const spec = FRAMES[items[0]];
  if (spec === undefined) throw new ProtocolError(`unknown frame type ${items[0]}`);
  const [type, ...names] = spec;
  if (items.length - 1 !== names.length) {
    throw new ProtocolError(`${type} has ${names.length} fields, got ${items.length - 1}`);
  }
  const frame = { type };
  names.forEach((name, index) => {
    frame[name] = items[index + 1];
  });
  return frame;
}

/**
 * One connection to a relay. After the Welcome, `listen(onFrame)` gets every frame; Pings are
 * answered here, and a fatal Error fails the connection. Sends keep PROTOCOL.md's rules: `syncRequest(doc)` before `update(doc, ...)`,
 * and seqs that strictly increase (one counter for the connection serves every document).
 */
export class Connection {
  static async open(url, token, { clientName = "foliosync-js", timeoutMs = 10000, heartbeatMs = 30000 } = {}) {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    ws.binaryType = "nodebuffer";
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no connection to ${url} in time`)), timeoutMs);
      ws.once("open", () => {
        clearTimeout(timer);
        resolve();
      });
      ws.once("error", (exc) => {
        clearTimeout(timer);
        reject(new Error(`cannot reach the relay at ${url}: ${exc.message}`));
      });
    });
    const connection = new Connection(ws);
    connection.welcome = await connection.#handshake(token, clientName, timeoutMs);
    connection.#startHeartbeat(heartbeatMs);
    return connection;
  }

  // A protocol Ping every `heartbeatMs`: the relay closes a connection that sent it nothing
  // for its idle timeout (120 s by default), and WebSocket pings, answered below it, do not
  // count. Unref'd, so that it never keeps node running on its own.
  #startHeartbeat(heartbeatMs) {
    if (!(heartbeatMs > 0)) return;
    let nonce = 0;
    this.#heartbeat = setInterval(() => {
      if (this.#failure || this.#ws.readyState !== WebSocket.OPEN) return;
      nonce += 1;
      this.#send("Ping", nonce);
    }, heartbeatMs);
    this.#heartbeat.unref?.();
  }

  #ws;
  #requested = new Set();
  #seq = 0;
  #waiting = [];
  #queue = [];
  #failure = null;
  #onFrame = null;
  #heartbeat = null;

  constructor(ws) {
    this.#ws = ws;
    ws.on("message", (data, isBinary) => this.#receive(data, isBinary));
    ws.on("close", (code, reason) => this.#fail(new Error(`the relay closed the connection (${code} ${reason})`)));
    ws.on("error", (exc) => this.#fail(exc));
  }

  #send(type, ...fields) {
    if (this.#failure) throw this.#failure;
    this.#ws.send(encodeFrame(type, ...fields), { binary: true });
  }

  #fail(exc) {
    if (!this.#failure) this.#failure = exc;
    clearInterval(this.#heartbeat);
    for (const waiter of this.#waiting.splice(0)) waiter.reject(this.#failure);
  }

  #receive(data, isBinary) {
    let frame;
    try {
      if (!isBinary) throw new ProtocolError("the relay sent a text message");
      frame = decodeFrame(data);
    } catch (exc) {
      this.#fail(exc);
      this.close();
      return;
    }
    if (frame.type === "Ping") {
      this.#send("Pong", frame.nonce);
      return;
    }
    if (frame.type === "Error" && (frame.doc === null || frame.doc === undefined)) {
      this.#fail(new RelayError(frame));
      return;
    }
    if (this.#onFrame) {
      this.#dispatch(frame);
    } else {
      this.#queue.push(frame);
      this.#waiting.shift()?.resolve();
    }
  }

  #dispatch(frame) {
    try {
      this.#onFrame(frame);
    } catch (exc) {
      this.#fail(exc);
    }
  }

  async #next(timeoutMs) {
    while (this.#queue.length === 0) {
      if (this.#failure) throw this.#failure;
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error("no answer from the relay in time")), timeoutMs);
        this.#waiting.push({
          resolve: () => (clearTimeout(timer), resolve()),
          reject: (exc) => (clearTimeout(timer), reject(exc)),
        });
      });
    }
    return this.#queue.shift();
  }

  async #handshake(token, clientName, timeoutMs) {
    this.#send("Hello", PROTOCOL_VERSION, token, clientName);
    const welcome = await this.#next(timeoutMs);
    if (welcome.type !== "Welcome") throw new ProtocolError(`expected a Welcome, got ${welcome.type}`, "unexpected_frame");
    if (welcome.protocol !== PROTOCOL_VERSION) {
      throw new ProtocolError(`the relay welcomed protocol ${welcome.protocol}`, "unsupported_version");
    }
    return welcome;
  }

  /** Hand every frame from now on (and any already waiting) to `onFrame(frame)`. */
  listen(onFrame) {
    this.#onFrame = onFrame;
    for (const frame of this.#queue.splice(0)) this.#dispatch(frame);
  }

  /** Ask for what we lack of `doc`; subscribes this connection to its live changes. */
  syncRequest(doc, stateVector) {
    this.#requested.add(doc);
    this.#send("SyncRequest", doc, stateVector);
  }

  /** Send a local change; returns its seq, which the relay's Ack will name. */
  update(doc, update) {
    if (!this.#requested.has(doc)) throw new Error(`Update of ${doc} before its SyncRequest`);
    this.#seq += 1;
    this.#send("Update", doc, this.#seq, update, null, null);
    return this.#seq;
  }

  /** Resolves when `check()` is true (checked after every frame); rejects on failure or timeout. */
  until(check, timeoutMs) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => finish(new Error("the relay did not answer in time")), timeoutMs);
      const finish = (exc) => {
        clearTimeout(timer);
        clearInterval(poll);
        if (exc) reject(exc);
        else resolve();
      };
      const poll = setInterval(() => {
        if (this.#failure) finish(this.#failure);
        else if (check()) finish();
      }, 5);
    });
  }

  close() {
    clearInterval(this.#heartbeat);
    if (this.#ws.readyState === WebSocket.OPEN || this.#ws.readyState === WebSocket.CONNECTING) {
      this.#ws.close(1000);
    }
  }
}
