// The official e2b JS SDK (2.51.0, installed in tests/compat/js by scripts/setup.sh) against a
// running `arca up` (issue 3): the P0 flows in real sandboxes. Run through the harness, which
// starts `arca up` and exports the recipe-A variables:
//   python3 tests/e2e/harness.py run -- node --test tests/e2e/js/sandbox.test.mjs
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { createRequire } from 'node:module'
import { after, describe, test } from 'node:test'

const compat = new URL('../../compat/js/package.json', import.meta.url)
const require = createRequire(compat)
const {
  AuthenticationError,
  CommandExitError,
  FilesystemEventType,
  NotFoundError,
  Sandbox,
  SandboxError,
} = require('e2b')

assert.equal(require('e2b/package.json').version, '2.51.0')
for (const v of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  assert.ok(process.env[v], `${v} is not set: run this through tests/e2e/harness.py`)
}
assert.ok(!process.env.E2B_DEBUG, 'E2B_DEBUG must be unset')

const unique = () => randomBytes(6).toString('hex')
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function waitUntil(pred, what, limitMs = 15000) {
  const deadline = Date.now() + limitMs
  for (;;) {
    if (await pred()) return
    if (Date.now() > deadline) assert.fail(`gave up waiting for: ${what}`)
    await sleep(100)
  }
}

const made = []
async function create(opts) {
  const s = await Sandbox.create({ timeoutMs: 300_000, ...opts })
  made.push(s)
  return s
}
after(async () => {
  for (const s of made) await s.kill().catch(() => {})
})

describe('sandbox lifecycle', () => {
  test('create with metadata, envs and timeout; getInfo', async () => {
    const tag = unique()
    const s = await create({ metadata: { e2e: tag }, envs: { E2E_VAR: tag }, timeoutMs: 90_000 })
    assert.match(s.sandboxId, /^[a-z0-9]+$/)
    assert.equal((await s.commands.run('echo $E2E_VAR')).stdout, `${tag}\n`)
    const info = await s.getInfo()
    assert.equal(info.sandboxId, s.sandboxId)
    assert.deepEqual(info.metadata, { e2e: tag })
    assert.equal(info.state, 'running')
    const life = info.endAt.getTime() - info.startedAt.getTime()
    assert.ok(life >= 88_000 && life <= 92_000, `lifetime ${life} ms`)
    assert.equal(await s.isRunning(), true)
  })

  test('list by metadata with paging', async () => {
    const tag = unique()
    const three = []
    for (let i = 0; i < 3; i++) three.push(await create({ metadata: { 'e2e-js': tag } }))
    const want = three.map((s) => s.sandboxId)
    const pages = []
    const p = Sandbox.list({ query: { metadata: { 'e2e-js': tag } }, limit: 2 })
    while (p.hasNext) {
      pages.push((await p.nextItems()).map((i) => i.sandboxId))
      assert.ok(pages.length <= 3, 'paging does not end')
    }
    assert.deepEqual(pages.map((x) => x.length), [2, 1])
    assert.deepEqual(pages.flat(), [...want].reverse())
    const paused = Sandbox.list({ query: { metadata: { 'e2e-js': tag }, state: ['paused'] } })
    assert.deepEqual(await paused.nextItems(), [])
  })

  test('connect from a second process', async () => {
    const s = await create()
    await s.files.write('/tmp/marker', 'from the first process')
    const script = `
      const { Sandbox } = require('e2b')
      Sandbox.connect(process.argv[1]).then(async (s) => {
        process.stdout.write(await s.files.read('/tmp/marker'))
      })`
    const out = execFileSync(process.execPath, ['-e', script, s.sandboxId], {
      cwd: new URL('.', compat).pathname,
      encoding: 'utf8',
      timeout: 60_000,
    })
    assert.equal(out, 'from the first process')
  })

  test('setTimeout then expiry', async () => {
    const s = await create()
    await s.setTimeout(2_000)
    await waitUntil(
      async () => {
        try {
          await Sandbox.getInfo(s.sandboxId)
          return false
        } catch (e) {
          if (e instanceof NotFoundError) return true
          throw e
        }
      },
      'the sandbox expired',
      20_000,
    )
    await assert.rejects(s.commands.run('echo still here'), SandboxError)
  })

  test('kill returns true, then false; unknown id false', async () => {
    const s = await Sandbox.create({ timeoutMs: 60_000 })
    assert.equal(await Sandbox.kill(s.sandboxId), true)
    assert.equal(await Sandbox.kill(s.sandboxId), false)
    assert.equal(await Sandbox.kill('i' + '0'.repeat(20)), false)
    await assert.rejects(Sandbox.getInfo(s.sandboxId), NotFoundError)
  })

  test('wrong API key', async () => {
    const apiKey = 'e2b_' + '0'.repeat(40)
    await assert.rejects(Sandbox.create({ apiKey }), AuthenticationError)
    await assert.rejects(Sandbox.list({ apiKey }).nextItems(), AuthenticationError)
  })
})

describe('inside a sandbox', () => {
  let s
  test('commands', async () => {
    s = await create()
    const r = await s.commands.run('id -un; echo err >&2; python3 -c "print(6*7)"')
    assert.equal(r.stdout, 'user\n42\n')
    assert.equal(r.stderr, 'err\n')
    await assert.rejects(s.commands.run('exit 3'), (e) => e instanceof CommandExitError && e.exitCode === 3)
    const h = await s.commands.run('sleep 0.2; echo bg', { background: true })
    assert.equal((await h.wait()).stdout, 'bg\n')
  })

  test('files', async () => {
    const dir = `/home/user/js-${unique()}`
    const blob = randomBytes(256 * 1024)
    await s.files.makeDir(dir)
    await s.files.write(`${dir}/b.bin`, blob)
    await s.files.write(`${dir}/a.txt`, 'hello')
    assert.equal(await s.files.read(`${dir}/a.txt`), 'hello')
    const back = await s.files.read(`${dir}/b.bin`, { format: 'bytes' })
    assert.ok(Buffer.from(back).equals(blob))
    assert.deepEqual((await s.files.list(dir)).map((e) => e.name).sort(), ['a.txt', 'b.bin'])
    assert.equal((await s.commands.run(`stat -c %U ${dir}/a.txt`)).stdout, 'user\n')
    await s.files.remove(dir)
    assert.equal(await s.files.exists(dir), false)
  })

  test('pty', async () => {
    let buf = ''
    const dec = new TextDecoder()
    const h = await s.pty.create({ cols: 80, rows: 24, onData: (d) => (buf += dec.decode(d)) })
    await s.pty.sendInput(h.pid, new TextEncoder().encode('echo "pty-$((40+2)) $(tput cols)"\n'))
    await waitUntil(() => buf.includes('pty-42 80'), 'PTY output')
    await s.pty.kill(h.pid)
  })

  test('watch', async () => {
    const dir = `/home/user/w-${unique()}`
    await s.files.makeDir(dir)
    const events = []
    const w = await s.files.watchDir(dir, (e) => events.push(e))
    await s.files.write(`${dir}/new.txt`, 'x')
    await waitUntil(
      () => events.some((e) => e.name === 'new.txt' && e.type === FilesystemEventType.CREATE),
      'a create event',
    )
    await w.stop()
  })
})

// Network settings (issue 6) through the JS SDK's own options. Nothing here resolves a name or
// sends a packet out of a sandbox: the remote-host tests in test_network_policy.py do that.
describe('network settings', () => {
  test('allowInternetAccess, traffic token, Host mask, updateNetwork, egress log', async () => {
    const s = await create({
      allowInternetAccess: false,
      network: { allowPublicTraffic: false, maskRequestHost: '${PORT}-js.test' },
    })
    assert.match(s.trafficAccessToken ?? '', /^[0-9a-f]{16,}$/)
    let info = await s.getInfo()
    assert.equal(info.allowInternetAccess, false)
    assert.equal(info.network?.allowPublicTraffic, false)
    assert.equal(info.network?.maskRequestHost, '${PORT}-js.test')

    const server = [
      'import http.server',
      'class H(http.server.BaseHTTPRequestHandler):',
      '    def do_GET(self):',
      '        b = self.headers.get("Host", "").encode()',
      '        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)',
      'http.server.HTTPServer(("0.0.0.0", 8000), H).serve_forever()',
    ].join('\n')
    await s.files.write('/tmp/host_echo.py', server)
    await s.commands.run('python3 /tmp/host_echo.py', { background: true })
    const viaProxy = (headers) =>
      fetch(process.env.E2B_SANDBOX_URL + '/', {
        headers: { 'E2b-Sandbox-Id': s.sandboxId, 'E2b-Sandbox-Port': '8000', ...headers },
      })
    await waitUntil(async () => (await viaProxy({ 'e2b-traffic-access-token': s.trafficAccessToken })).status === 200, 'the server')
    const denied = await viaProxy({})
    assert.equal(denied.status, 403)
    assert.equal((await denied.json()).code, 403)
    assert.equal((await viaProxy({ 'e2b-traffic-access-token': 'wrong' })).status, 403)
    const ok = await viaProxy({ 'e2b-traffic-access-token': s.trafficAccessToken })
    assert.equal(await ok.text(), '8000-js.test')

    await s.updateNetwork({ denyOut: ['0.0.0.0/0'], allowOut: ['198.18.0.0/15'] })
    info = await s.getInfo()
    assert.deepEqual(info.network?.allowOut, ['198.18.0.0/15'])
    assert.deepEqual(info.network?.denyOut, ['0.0.0.0/0'])
    await assert.rejects(s.updateNetwork({ allowOut: ['example.test'] }), (e) => /0\.0\.0\.0\/0/.test(e.message))

    const r = await fetch(`${process.env.E2B_API_URL}/sandboxes/${s.sandboxId}/network/logs`, {
      headers: { 'X-API-KEY': process.env.E2B_API_KEY },
    })
    assert.equal(r.status, 200)
    assert.ok(Array.isArray((await r.json()).entries))
  })
})
