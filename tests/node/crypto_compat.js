#!/usr/bin/env node
// Encrypts/decrypts IMAP passwords exactly like the Node backend does, so the Python
// side (trio_idle/core/crypto.py) can be tested against the real thing. No npm dependencies.
//
//   ENCRYPTION_KEY=... [KEY_DERIVATION=utf8-prefix|sha256] [IV_SIZE=12|16] \
//     node crypto_compat.js encrypt   < password   > token
//   ENCRYPTION_KEY=... [KEY_DERIVATION=...] node crypto_compat.js decrypt < token > password
//
// Secrets never travel in argv: the key comes from the environment, the password or token
// from stdin (read raw: no newline is stripped from a password; a token is trimmed).
// stdout is exactly the token or the UTF-8 password. On failure: exit 1, and stderr gets
// the error class/message only (Node's messages carry no key or plaintext).
'use strict'

const crypto = require('node:crypto')
const fs = require('node:fs')

function deriveKey () {
  const raw = process.env.ENCRYPTION_KEY
  if (raw === undefined) throw new Error('ENCRYPTION_KEY is not set')
  const derivation = process.env.KEY_DERIVATION || 'utf8-prefix'
  if (derivation === 'utf8-prefix') return Buffer.from(raw, 'utf8').subarray(0, 32)
  if (derivation === 'sha256') return crypto.createHash('sha256').update(raw, 'utf8').digest()
  throw new Error(`unknown KEY_DERIVATION ${derivation}`)
}

// The backend's encrypt, verbatim apart from where key, IV size and input come from.
function encrypt (pw, key, ivSize) {
  const iv = crypto.randomBytes(ivSize)
  const c = crypto.createCipheriv('aes-256-gcm', key, iv)
  const enc = Buffer.concat([c.update(pw, 'utf8'), c.final()])
  return `${iv.toString('hex')}:${c.getAuthTag().toString('hex')}:${enc.toString('hex')}`
}

// The backend's decrypt.
function decrypt (token, key) {
  const [ivHex, tagHex, encHex] = token.split(':')
  const d = crypto.createDecipheriv('aes-256-gcm', key, Buffer.from(ivHex, 'hex'))
  d.setAuthTag(Buffer.from(tagHex, 'hex'))
  return Buffer.concat([d.update(Buffer.from(encHex, 'hex')), d.final()]).toString('utf8')
}

function main () {
  const mode = process.argv[2]
  const input = fs.readFileSync(0)
  const key = deriveKey()
  if (mode === 'encrypt') {
    const ivSize = Number(process.env.IV_SIZE || '16')
    if (ivSize !== 12 && ivSize !== 16) throw new Error('IV_SIZE must be 12 or 16')
    process.stdout.write(encrypt(input.toString('utf8'), key, ivSize))
  } else if (mode === 'decrypt') {
    process.stdout.write(Buffer.from(decrypt(input.toString('utf8').trim(), key), 'utf8'))
  } else {
    throw new Error('usage: crypto_compat.js encrypt|decrypt (key in env, input on stdin)')
  }
}

try {
  main()
} catch (err) {
  process.stderr.write(`crypto_compat: ${err && err.name}: ${err && err.message}\n`)
  process.exitCode = 1
}
