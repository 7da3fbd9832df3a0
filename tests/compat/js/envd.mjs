// Starts one arca-envd for the JS suite (through ../run-envd.sh) and points the e2b SDK at it
// in debug mode (CONTRACT.md 1.3).
//
// Environment: ARCA_ENVD_BIN (binary; default: musl release build, else debug build),
// ARCA_ENVD_PORT (default 29997).
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const repo = resolve(here, '..', '..', '..')

export const PORT = Number(process.env.ARCA_ENVD_PORT ?? '29997')
export const BASE_URL = `http://127.0.0.1:${PORT}`
export const SANDBOX_ENV = { ARCA_SANDBOX_WIDE: 'from-init', ARCA_OVERRIDDEN: 'from-init' }

process.env.E2B_DEBUG = 'true'
process.env.E2B_SANDBOX_URL = BASE_URL
process.env.E2B_API_KEY ??= 'e2b_' + '0123456789abcdef'.repeat(2) + '01234567'

function envdBinary() {
  if (process.env.ARCA_ENVD_BIN) return process.env.ARCA_ENVD_BIN
  for (const rel of [
    'target/x86_64-unknown-linux-musl/release/arca-envd',
    'target/debug/arca-envd',
  ]) {
    if (existsSync(join(repo, rel))) return join(repo, rel)
  }
  throw new Error('no arca-envd binary: set ARCA_ENVD_BIN or build it first')
}

let pid

export async function startEnvd() {
  const out = execFileSync(join(repo, 'tests/compat/run-envd.sh'), [envdBinary(), String(PORT)], {
    encoding: 'utf8',
    timeout: 60_000,
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  pid = Number(out.trim().split('\n').pop())
  const res = await fetch(`${BASE_URL}/init`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({
      defaultUser: 'user',
      defaultWorkdir: '/home/user',
      envVars: SANDBOX_ENV,
    }),
  })
  if (res.status !== 204) throw new Error(`/init answered ${res.status}`)
}

export function stopEnvd() {
  if (pid) {
    execFileSync(join(repo, 'tests/compat/stop-envd.sh'), [String(pid)], {
      timeout: 60_000,
      stdio: 'inherit',
    })
    pid = undefined
  }
}

/** Polls `predicate` until true; bounded so a missing behaviour fails instead of hanging. */
export async function waitUntil(predicate, what, limitMs = 15_000) {
  const deadline = Date.now() + limitMs
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for: ${what}`)
    await new Promise((r) => setTimeout(r, 25))
  }
}
