// foliosync's document layouts over plain Yjs, from PROTOCOL.md section 6: ids from kind and
// name, HLC stamps, later-wins slots, the watchlist and the user's index.

import blake from "blakejs";
import { generateKeyBetween } from "fractional-indexing";

export const SEP = "\x1f";
export const INDEX_ID = "index";
const SYMBOL = /^[A-Z0-9]{1,10}(?:[.-][A-Z0-9]{1,6})?$/;
const MAX_NAME = 100;

// White space as PROTOCOL.md section 6 lists it (Python's str.split()): not JavaScript's \s,
// which takes U+FEFF and leaves U+0085 and U+001C-U+001F, so one typed name gave two ids.
const WHITE_SPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/u;

/** A name with its white space collapsed; Error for an empty, long or control-laden one. */
export function normalizeName(name) {
  const cleaned = String(name).split(WHITE_SPACE).filter(Boolean).join(" ");
  if (!cleaned) throw new Error("a name cannot be empty");
  if (cleaned.length > MAX_NAME) throw new Error(`a name has at most ${MAX_NAME} characters`);
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f]/u.test(cleaned)) throw new Error("a name cannot contain control characters");
  return cleaned;
}

/**
 * The id of a watchlist or portfolio: prefix + BLAKE2b with a 12-byte digest of the case-folded
 * name. JavaScript has no Unicode case folding; lower-casing is the same except for letters whose
 * folding is not their lower case ("ß" folds to "ss", "ς" to "σ", "ﬁ" to "fi"): a new name with
 * one of those is refused, so that this client and a Python device never make two documents of
 * one name. A document that exists is found by its name in the index instead.
 */
export function documentId(kind, name) {
  const prefix = { watchlist: "wl-", portfolio: "pf-" }[kind];
  if (!prefix) throw new Error(`no id derives from kind ${kind}`);
  const lowered = normalizeName(name).toLowerCase();
  for (const letter of lowered) {
    if (letter.toUpperCase().toLowerCase() !== letter) {
      throw new Error(
        `the name ${JSON.stringify(name)} holds ${JSON.stringify(letter)}, whose case folding ` +
          "this client cannot derive: create it from a Python device, or choose another name",
      );
    }
  }
  const key = new TextEncoder().encode(lowered);
  return prefix + blake.blake2bHex(key, null, 12);
}

/** The canonical form of a symbol the user typed; Error for an invalid one. */
export function normalizeSymbol(symbol) {
  const candidate = String(symbol).trim().toUpperCase();
  if (!SYMBOL.test(candidate) || !/[A-Z]/.test(candidate)) {
    throw new Error(`invalid symbol ${JSON.stringify(String(symbol))}: expected e.g. AAPL, BRK.B or RDS-A`);
  }
  return candidate;
}

// --- Hybrid logical clock stamps: 13 hex digits of ms, 4 of a counter -------------------------

const COUNTER_MAX = 0xffff;

function parseStamp(stamp) {
  if (typeof stamp !== "string" || !/^[0-9a-f]{17}$/.test(stamp)) return null;
  return [parseInt(stamp.slice(0, 13), 16), parseInt(stamp.slice(13), 16)];
}

function formatStamp([ms, counter]) {
  return ms.toString(16).padStart(13, "0") + counter.toString(16).padStart(4, "0");
}

export class HybridClock {
  #last = [0, 0];

  /** Every stamp issued from now on sorts above `stamp` (PROTOCOL.md: stamp above all you read). */
  observe(stamp) {
    const parsed = parseStamp(stamp);
    if (parsed && (parsed[0] > this.#last[0] || (parsed[0] === this.#last[0] && parsed[1] > this.#last[1]))) {
      this.#last = parsed;
    }
  }

  now() {
    const wall = Date.now();
    const [ms, counter] = this.#last;
    if (wall > ms) this.#last = [wall, 0];
    else if (counter < COUNTER_MAX) this.#last = [ms, counter + 1];
    else this.#last = [ms + 1, 0];
    return formatStamp(this.#last);
  }
}

// --- Later-wins slots: ENTITY \x1f FIELD \x1f DEVICE -> [stamp, value] -----------------------

/** entity -> field -> {stamp, device, value}, the slot with the highest (stamp, device) winning. */
export function resolveSlots(fields, clock) {
  const winners = new Map();
  for (const [key, raw] of fields.entries()) {
    const parts = key.split(SEP);
    if (parts.length !== 3 || !Array.isArray(raw) || raw.length !== 2 || typeof raw[0] !== "string") continue;
    const [entity, field, device] = parts;
    const [stamp, value] = raw;
    clock?.observe(stamp);
    if (!winners.has(entity)) winners.set(entity, new Map());
    const current = winners.get(entity).get(field);
    if (!current || stamp > current.stamp || (stamp === current.stamp && device > current.device)) {
      winners.get(entity).set(field, { stamp, device, value });
    }
  }
  return winners;
}

function isValidKey(key) {
  if (typeof key !== "string") return false;
  try {
    generateKeyBetween(key, null); // validates the key
    return true;
  } catch {
    return false;
  }
}

// --- The watchlist (PROTOCOL.md 6.2) ---------------------------------------------------------

export class Watchlist {
  /** `doc` is a Y.Doc; `device` the stable id written into this device's keys. */
  constructor(doc, device, clock = new HybridClock()) {
    this.doc = doc;
    this.device = device;
    this.clock = clock;
    this.meta = doc.getMap("meta");
    this.symbols = doc.getMap("symbols");
    this.fields = doc.getMap("fields");
  }

  get name() {
    const name = this.meta.get("name");
    return typeof name === "string" ? name : "";
  }

  get exists() {
    return this.meta.get("kind") === "watchlist" || this.symbols.size > 0;
  }

  /** Entries in display order: by (position, symbol); an unreadable position sorts last. */
  entries() {
    const slots = resolveSlots(this.fields, this.clock);
    const added = new Map();
    for (const [key, raw] of this.symbols.entries()) {
      const symbol = key.split(SEP)[0];
      let stamp = raw && typeof raw === "object" && typeof raw.t === "string" ? raw.t : "";
      this.clock.observe(stamp);
      if (!added.has(symbol) || stamp < added.get(symbol)) added.set(symbol, stamp);
    }
    const entries = [];
    for (const [symbol, since] of added) {
      const fields = slots.get(symbol) ?? new Map();
      const newer = (slot) => (slot && slot.stamp >= since ? slot.value : null);
      const position = newer(fields.get("pos"));
      const note = newer(fields.get("note"));
      entries.push({
        symbol,
        note: typeof note === "string" && note ? note : null,
        position: isValidKey(position) ? position : "~",
      });
    }
    const order = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
    return entries.sort((a, b) => order(a.position, b.position) || order(a.symbol, b.symbol));
  }

  symbolList() {
    return this.entries().map((entry) => entry.symbol);
  }

  /** Write kind and name, as every device does when it creates the document. */
  initialize(name) {
    this.doc.transact(() => {
      if (this.meta.get("kind") !== "watchlist") this.meta.set("kind", "watchlist");
      if (this.meta.get("name") !== name) this.meta.set("name", name);
    }, "local");
  }

  /** Append the symbols not yet present; returns those added. */
  add(symbols, note = null) {
    const wanted = [...new Set(symbols.map(normalizeSymbol))];
    const entries = this.entries(); // read first: the clock has then seen every stamp
    const present = new Set(entries.map((entry) => entry.symbol));
    let last = null;
    for (const entry of entries) if (entry.position !== "~") last = entry.position;
    const added = [];
    this.doc.transact(() => {
      for (const symbol of wanted) {
        if (present.has(symbol)) continue;
        const stamp = this.clock.now();
        last = generateKeyBetween(last, null);
        this.symbols.set(symbol + SEP + this.device, { t: stamp });
        this.fields.set([symbol, "pos", this.device].join(SEP), [stamp, last]);
        if (note) this.fields.set([symbol, "note", this.device].join(SEP), [stamp, note]);
        added.push(symbol);
      }
    }, "local");
    return added;
  }
}

// --- The user's index (PROTOCOL.md 6.3) ------------------------------------------------------

export class UserIndex {
  constructor(doc, clock = new HybridClock()) {
    this.doc = doc;
    this.clock = clock;
    this.documents = doc.getMap("documents");
  }

  /** [{id, kind, name}] of the entries that read as documents. */
  entries() {
    const entries = [];
    for (const [id, raw] of this.documents.entries()) {
      if (!raw || typeof raw !== "object" || typeof raw.name !== "string") continue;
      this.clock.observe(raw.t);
      const kind = id.startsWith("wl-") ? "watchlist" : id.startsWith("pf-") ? "portfolio" : null;
      if (kind && /^[0-9a-f]{24}$/.test(id.slice(3))) entries.push({ id, kind, name: raw.name });
    }
    return entries;
  }

  /** The id of the document of that kind and name, from the index, else derived. */
  find(kind, name) {
    const wanted = normalizeName(name).toLowerCase();
    const entry = this.entries().find((e) => e.kind === kind && normalizeName(e.name).toLowerCase() === wanted);
    return entry ? entry.id : documentId(kind, name);
  }

  register(id, kind, name) {
    const current = this.documents.get(id);
    if (current && typeof current === "object" && current.name === name) return;
    this.entries(); // the clock sees every stamp first
    this.doc.transact(() => this.documents.set(id, { kind, name, t: this.clock.now() }), "local");
  }
}
