// Updates written by the real yjs package, for tests/test_updates.py: one JSON object on stdout
// mapping a case name to {v1, v2} (hex; v2 is absent where only V1 makes sense).
// Run with NODE_PATH pointing at a node_modules that holds yjs (CommonJS, so NODE_PATH works).
'use strict'
const Y = require('yjs')

const hex = (u8) => Buffer.from(u8).toString('hex')
const cases = {}

/** A fresh doc with a fixed client id, edited by `edit`; records its whole state both ways. */
const record = (name, edit, clientID = 1000 + Object.keys(cases).length) => {
  const doc = new Y.Doc()
  doc.clientID = clientID
  edit(doc)
  cases[name] = { v1: hex(Y.encodeStateAsUpdate(doc)), v2: hex(Y.encodeStateAsUpdateV2(doc)) }
  return doc
}

record('empty', () => {})
record('string', (doc) => doc.getText('t').insert(0, 'hello world'))
record('string-utf16', (doc) => {
  const text = doc.getText('t')
  text.insert(0, 'caf\u00e9 \u{1F600} \u65e5\u672c')
  text.insert(2, '\u{1F4C8}')
})
record('embed', (doc) => {
  const text = doc.getText('t')
  text.insert(0, 'ab')
  text.insertEmbed(1, { image: 'chart.png', size: [3, 4] })
})
record('format', (doc) => {
  const text = doc.getText('t')
  text.insert(0, 'bold and plain')
  text.format(0, 4, { bold: true, color: '#ff0000' })
})
record('binary', (doc) => {
  doc.getMap('m').set('bytes', new Uint8Array([0, 1, 2, 250, 255]))
  doc.getArray('a').insert(0, [new Uint8Array([9, 8, 7])])
})
record('any', (doc) => {
  doc.getArray('a').insert(0, [
    1, -1, 2 ** 31, -(2 ** 40), 1.5, 0.1, -0, Number.MAX_VALUE, { big: 1234567890123456789n },
    'text', '', true, false, null, { missing: undefined },
    { nested: { list: [1, 'two', { three: 3 }], bytes: new Uint8Array([1, 2]) }, empty: {} },
    [], [[[]]]
  ])
  doc.getMap('m').set('value', { symbol: 'AAPL', note: null })
})
record('type', (doc) => {
  const map = doc.getMap('m')
  const inner = new Y.Map()
  map.set('inner', inner)
  inner.set('k', 'v')
  const list = new Y.Array()
  map.set('list', list)
  list.insert(0, ['x', 'y'])
  const text = new Y.Text()
  list.push([text])
  text.insert(0, 'nested text')
})
record('xml', (doc) => {
  const fragment = doc.getXmlFragment('prosemirror')
  const paragraph = new Y.XmlElement('paragraph')
  paragraph.setAttribute('align', 'left')
  const text = new Y.XmlText()
  text.insert(0, 'words')
  paragraph.insert(0, [text])
  fragment.insert(0, [paragraph, new Y.XmlElement('hr')])
})
record('subdoc', (doc) => {
  doc.getMap('m').set('sub', new Y.Doc({ guid: 'a-sub-document', meta: { kind: 'notes' } }))
  doc.getArray('a').insert(0, [new Y.Doc({ guid: 'another' })])
})
record('deleted', (doc) => {
  const list = doc.getArray('a')
  list.insert(0, ['a', 'b', 'c', 'd', 'e'])
  list.delete(1, 3)
  const map = doc.getMap('m')
  map.set('k', 1)
  map.set('k', 2)
  map.set('k', 3)
  const text = doc.getText('t')
  text.insert(0, 'abcdef')
  text.delete(2, 2)
})
record('gc', (doc) => {
  const map = doc.getMap('m')
  const inner = new Y.Map()
  map.set('inner', inner)
  inner.set('a', 'x')
  inner.set('b', new Y.Array())
  map.delete('inner')
})
record('no-gc', (doc) => {
  const list = doc.getArray('a')
  list.insert(0, [1, 2, 3])
  list.delete(0, 2)
}, 77)

// Two clients editing the same text concurrently, merged: origins and right origins of another
// client's items.
{
  const a = new Y.Doc()
  a.clientID = 10
  const b = new Y.Doc()
  b.clientID = 20
  a.getText('t').insert(0, 'shared')
  Y.applyUpdate(b, Y.encodeStateAsUpdate(a))
  a.getText('t').insert(3, 'AAA')
  b.getText('t').insert(3, 'BBB')
  b.getText('t').delete(0, 1)
  Y.applyUpdate(a, Y.encodeStateAsUpdate(b))
  Y.applyUpdate(b, Y.encodeStateAsUpdate(a))
  cases['two-clients'] = { v1: hex(Y.encodeStateAsUpdate(a)), v2: hex(Y.encodeStateAsUpdateV2(a)) }
  const bOnly = Y.encodeStateAsUpdate(b, Y.encodeStateVector(new Y.Doc()))
  cases['two-clients-b'] = { v1: hex(bOnly) }
}

// Incremental updates of one client: the first, the third (which depends on the second), and
// the first and third merged (the second becomes a Skip).
{
  const doc = new Y.Doc()
  doc.clientID = 30
  const updates = []
  const updatesV2 = []
  doc.on('update', (u) => updates.push(u))
  doc.on('updateV2', (u) => updatesV2.push(u))
  const list = doc.getArray('a')
  list.insert(0, ['one'])
  list.insert(1, ['two'])
  list.insert(2, ['three'])
  list.delete(0, 1)
  cases['incremental-1'] = { v1: hex(updates[0]), v2: hex(updatesV2[0]) }
  cases['incremental-3'] = { v1: hex(updates[2]), v2: hex(updatesV2[2]) }
  cases['incremental-delete'] = { v1: hex(updates[3]), v2: hex(updatesV2[3]) }
  cases.skip = {
    v1: hex(Y.mergeUpdates([updates[0], updates[2]])),
    v2: hex(Y.mergeUpdatesV2([updatesV2[0], updatesV2[2]]))
  }
  cases.merged = {
    v1: hex(Y.mergeUpdates(updates)),
    v2: hex(Y.mergeUpdatesV2(updatesV2))
  }
}

// A Y.XmlHook: yrs reads it differently from Yjs, so the decoder refuses it.
record('xml-hook', (doc) => {
  doc.getXmlFragment('f').insert(0, [new Y.XmlHook('custom')])
})

process.stdout.write(JSON.stringify(cases))
