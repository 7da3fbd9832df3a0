// The official e2b JS SDK (pinned in package.json) against arca-envd: commands, PTY, files,
// watches. Run with `npm test` (or `node --test`) after scripts/setup.sh.
import assert from 'node:assert/strict'
import { randomBytes, randomInt } from 'node:crypto'
import { after, before, describe, test } from 'node:test'

import {
  AuthenticationError,
  CommandExitError,
  FileNotFoundError,
  FileType,
  FilesystemEventType as Ev,
  InvalidArgumentError,
  NotFoundError,
  Sandbox,
  TimeoutError,
} from 'e2b'

import { SANDBOX_ENV, startEnvd, stopEnvd, waitUntil } from './envd.mjs'

let sbx

before(async () => {
  await startEnvd()
  sbx = await Sandbox.create()
})

after(() => stopEnvd())

const uniqueSleep = () => `sleep 30.${randomInt(100000, 999999)}`

async function processExists(pid) {
  const r = await sbx.commands.run(`kill -0 ${pid} 2>/dev/null && echo alive || echo gone`, {
    user: 'root',
  })
  return r.stdout === 'alive\n'
}

async function freshDir() {
  const dir = `/home/user/js-${randomBytes(5).toString('hex')}`
  assert.equal(await sbx.files.makeDir(dir), true)
  return dir
}

describe('commands', () => {
  test('foreground stdout, stderr and exit code', async () => {
    const r = await sbx.commands.run('echo hello; echo oops >&2')
    assert.equal(r.stdout, 'hello\n')
    assert.equal(r.stderr, 'oops\n')
    assert.equal(r.exitCode, 0)
  })

  test('callbacks receive the output', async () => {
    const out = []
    const err = []
    await sbx.commands.run('echo one; echo two >&2', {
      onStdout: (d) => out.push(d),
      onStderr: (d) => err.push(d),
    })
    assert.equal(out.join(''), 'one\n')
    assert.equal(err.join(''), 'two\n')
  })

  test('non-zero exit throws CommandExitError with the output', async () => {
    await assert.rejects(sbx.commands.run('echo partial; echo broken >&2; exit 3'), (e) => {
      assert.ok(e instanceof CommandExitError, String(e))
      assert.equal(e.exitCode, 3)
      assert.equal(e.stdout, 'partial\n')
      assert.equal(e.stderr, 'broken\n')
      return true
    })
  })

  test('large multi-byte output arrives unchanged', async () => {
    const r = await sbx.commands.run("for i in $(seq 40000); do printf 'ž'; done")
    assert.equal(r.stdout, 'ž'.repeat(40000))
  })

  test('background command: wait', async () => {
    const h = await sbx.commands.run('echo bg', { background: true })
    assert.ok(h.pid > 0)
    const r = await h.wait()
    assert.equal(r.stdout, 'bg\n')
    assert.equal(r.exitCode, 0)
  })

  test('background command: kill returns true, process is gone', async () => {
    const h = await sbx.commands.run(uniqueSleep(), { background: true })
    assert.equal(await processExists(h.pid), true)
    assert.equal(await h.kill(), true)
    await assert.rejects(h.wait(), (e) => e instanceof CommandExitError && e.exitCode === -1)
    assert.equal(await processExists(h.pid), false)
  })

  test('kill of an unknown pid returns false', async () => {
    assert.equal(await sbx.commands.kill(999999), false)
  })

  test('list shows a running background command', async () => {
    const cmd = uniqueSleep()
    const h = await sbx.commands.run(cmd, { background: true, envs: { ARCA_LISTED: '1' } })
    try {
      const p = (await sbx.commands.list()).find((x) => x.pid === h.pid)
      assert.ok(p, 'process listed')
      assert.equal(p.cmd, '/bin/bash')
      assert.deepEqual(p.args, ['-l', '-c', cmd])
      assert.deepEqual(p.envs, { ARCA_LISTED: '1' })
      assert.equal(p.tag, undefined)
    } finally {
      await h.kill()
    }
    assert.equal((await sbx.commands.list()).some((x) => x.pid === h.pid), false)
  })

  test('connect receives later output', async () => {
    const h = await sbx.commands.run('cat', { background: true, stdin: true })
    const attached = await sbx.commands.connect(h.pid)
    await sbx.commands.sendStdin(h.pid, 'after connect\n')
    await sbx.commands.closeStdin(h.pid)
    const r = await attached.wait()
    assert.equal(r.stdout, 'after connect\n')
    assert.equal((await h.wait()).stdout, 'after connect\n')
  })

  test('connect to an unknown pid fails with NotFoundError', async () => {
    await assert.rejects(sbx.commands.connect(999999), NotFoundError)
  })

  test('stdin: sendStdin then closeStdin', async () => {
    const h = await sbx.commands.run('cat', { background: true, stdin: true })
    await h.sendStdin('line one\n')
    await h.sendStdin(new TextEncoder().encode('bytes two\n'))
    await h.closeStdin()
    assert.equal((await h.wait()).stdout, 'line one\nbytes two\n')
  })

  test('stdin is closed by default', async () => {
    const r = await sbx.commands.run('cat; echo done', { timeoutMs: 20_000 })
    assert.equal(r.stdout, 'done\n')
  })

  test('per-command envs override sandbox-wide envs and do not leak', async () => {
    const r = await sbx.commands.run(
      'echo "$ARCA_ONLY_HERE|$ARCA_SANDBOX_WIDE|$ARCA_OVERRIDDEN"',
      { envs: { ARCA_ONLY_HERE: 'yes', ARCA_OVERRIDDEN: 'per-command' } },
    )
    assert.equal(r.stdout, `yes|${SANDBOX_ENV.ARCA_SANDBOX_WIDE}|per-command\n`)
    const again = await sbx.commands.run('echo "[$ARCA_ONLY_HERE]"')
    assert.equal(again.stdout, '[]\n')
  })

  test('cwd, default workdir and missing cwd', async () => {
    assert.equal((await sbx.commands.run('pwd', { cwd: '/tmp' })).stdout, '/tmp\n')
    assert.equal((await sbx.commands.run('pwd')).stdout, '/home/user\n')
    await assert.rejects(sbx.commands.run('pwd', { cwd: '/does/not/exist' }), InvalidArgumentError)
  })

  test('users: default, root, user, unknown', async () => {
    assert.equal((await sbx.commands.run('whoami')).stdout, 'user\n')
    assert.equal(
      (await sbx.commands.run('echo "$(id -u) $HOME"', { user: 'root' })).stdout,
      '0 /root\n',
    )
    assert.equal(
      (await sbx.commands.run('echo "$(id -u) $HOME"', { user: 'user' })).stdout,
      '1000 /home/user\n',
    )
    await assert.rejects(sbx.commands.run('whoami', { user: 'nosuchuser' }), AuthenticationError)
  })

  test('timeout raises TimeoutError and kills the process', async () => {
    const h = await sbx.commands.run(uniqueSleep(), { background: true, timeoutMs: 1000 })
    await assert.rejects(h.wait(), TimeoutError)
    await waitUntil(
      async () => !(await sbx.commands.list()).some((x) => x.pid === h.pid),
      'process removed from the list after its timeout',
    )
    await waitUntil(async () => !(await processExists(h.pid)), 'process gone after its timeout')
  })
})

describe('pty', () => {
  test('input, output, resize and kill', async () => {
    let buf = ''
    const dec = new TextDecoder()
    const h = await sbx.pty.create({
      cols: 80,
      rows: 24,
      onData: (d) => {
        buf += dec.decode(d, { stream: true })
      },
    })
    const send = (s) => sbx.pty.sendInput(h.pid, new TextEncoder().encode(s))
    await send('echo hi-$((40+2))\n')
    await waitUntil(() => buf.includes('hi-42'), 'echo output in the PTY')
    await sbx.pty.resize(h.pid, { cols: 123, rows: 30 })
    await send('echo "size=$(tput cols)x$(tput lines)"\n')
    await waitUntil(() => buf.includes('size=123x30'), 'tput reflects the new size')
    assert.equal(await sbx.pty.kill(h.pid), true)
    await assert.rejects(h.wait(), (e) => e instanceof CommandExitError && e.exitCode === -1)
  })
})

describe('files', () => {
  test('write and read text, bytes, stream', async () => {
    const dir = await freshDir()
    const info = await sbx.files.write(`${dir}/hello.txt`, 'hello žluťoučký\n')
    assert.deepEqual([info.name, info.type, info.path], ['hello.txt', FileType.FILE, `${dir}/hello.txt`])
    assert.equal(await sbx.files.read(`${dir}/hello.txt`), 'hello žluťoučký\n')

    const data = new Uint8Array(256 * 4096).map((_, i) => i % 256)
    await sbx.files.write(`${dir}/bytes.bin`, data.buffer)
    const got = await sbx.files.read(`${dir}/bytes.bin`, { format: 'bytes' })
    assert.deepEqual(Buffer.from(got), Buffer.from(data))

    const stream = await sbx.files.read(`${dir}/bytes.bin`, { format: 'stream' })
    const chunks = []
    for await (const c of stream) chunks.push(Buffer.from(c))
    assert.deepEqual(Buffer.concat(chunks), Buffer.from(data))

    const blob = await sbx.files.read(`${dir}/hello.txt`, { format: 'blob' })
    assert.equal(await blob.text(), 'hello žluťoučký\n')
  })

  test('write a stream and a list of files', async () => {
    const dir = await freshDir()
    const body = new Blob(['streamed ', 'content']).stream()
    await sbx.files.write(`${dir}/streamed.txt`, body)
    assert.equal(await sbx.files.read(`${dir}/streamed.txt`), 'streamed content')

    const infos = await sbx.files.write([
      { path: `${dir}/many/a.txt`, data: 'A' },
      { path: `${dir}/many/b.txt`, data: 'B' },
    ])
    assert.deepEqual(
      infos.map((i) => i.path),
      [`${dir}/many/a.txt`, `${dir}/many/b.txt`],
    )
    assert.equal(await sbx.files.read(`${dir}/many/b.txt`), 'B')
  })

  test('list depth 1 and 2, exists, getInfo', async () => {
    const dir = await freshDir()
    await sbx.files.write(`${dir}/a.txt`, 'hello')
    await sbx.files.write(`${dir}/b/c.txt`, 'c')
    await sbx.files.write(`${dir}/b/d/e.txt`, 'e')
    const one = await sbx.files.list(dir)
    assert.deepEqual(
      one.map((e) => [e.path, e.type]),
      [
        [`${dir}/a.txt`, FileType.FILE],
        [`${dir}/b`, FileType.DIR],
      ],
    )
    const two = await sbx.files.list(dir, { depth: 2 })
    assert.deepEqual(
      two.map((e) => [e.path, e.type]),
      [
        [`${dir}/a.txt`, FileType.FILE],
        [`${dir}/b`, FileType.DIR],
        [`${dir}/b/c.txt`, FileType.FILE],
        [`${dir}/b/d`, FileType.DIR],
      ],
    )
    assert.equal(await sbx.files.exists(`${dir}/a.txt`), true)
    assert.equal(await sbx.files.exists(`${dir}/zzz`), false)
    const info = await sbx.files.getInfo(`${dir}/a.txt`)
    assert.equal(info.name, 'a.txt')
    assert.equal(info.type, FileType.FILE)
    assert.equal(info.size, 5)
    assert.equal(info.mode, 0o644)
    assert.equal(info.permissions, '-rw-r--r--')
    assert.equal(info.owner, 'user')
    assert.equal(info.group, 'user')
    const dinfo = await sbx.files.getInfo(dir)
    assert.equal(dinfo.type, FileType.DIR)
    assert.equal(dinfo.permissions, 'drwxr-xr-x')
  })

  test('makeDir, rename, remove', async () => {
    const dir = await freshDir()
    assert.equal(await sbx.files.makeDir(`${dir}/x/y`), true)
    assert.equal(await sbx.files.makeDir(`${dir}/x/y`), false)
    await sbx.files.write(`${dir}/old.txt`, 'moving')
    const moved = await sbx.files.rename(`${dir}/old.txt`, `${dir}/x/new.txt`)
    assert.equal(moved.path, `${dir}/x/new.txt`)
    assert.equal(await sbx.files.exists(`${dir}/old.txt`), false)
    assert.equal(await sbx.files.read(`${dir}/x/new.txt`), 'moving')
    await sbx.files.remove(`${dir}/x`)
    assert.equal(await sbx.files.exists(`${dir}/x`), false)
    await sbx.files.remove(`${dir}/never-existed`)
  })

  test('ownership follows the user', async () => {
    const dir = await freshDir()
    await sbx.files.write(`${dir}/mine.txt`, 'u')
    await sbx.files.write(`${dir}/roots.txt`, 'r', { user: 'root' })
    const r = await sbx.commands.run(`stat -c '%n %u:%g' ${dir}/mine.txt ${dir}/roots.txt`)
    assert.equal(r.stdout, `${dir}/mine.txt 1000:1000\n${dir}/roots.txt 0:0\n`)
  })

  test('errors', async () => {
    const dir = await freshDir()
    await assert.rejects(sbx.files.read(`${dir}/missing`), FileNotFoundError)
    await assert.rejects(sbx.files.getInfo(`${dir}/missing`), FileNotFoundError)
    await assert.rejects(sbx.files.read(dir), InvalidArgumentError)
    await assert.rejects(sbx.files.read(`${dir}/x`, { user: 'nosuchuser' }), AuthenticationError)
  })

  test('rejected uploads surface as the mapped error, never a broken connection', async () => {
    const dir = await freshDir()
    await sbx.files.makeDir(`${dir}/adir`)
    for (let i = 0; i < 100; i++) {
      await assert.rejects(sbx.files.write(`${dir}/adir`, 'x'.repeat(1000)), InvalidArgumentError)
      await assert.rejects(
        sbx.files.write(`${dir}/f`, 'x'.repeat(100_000), { user: 'nosuchuser' }),
        AuthenticationError,
      )
    }
  })

  test('uploadUrl and downloadUrl', async () => {
    const dir = await freshDir()
    const form = new FormData()
    form.append('file', new Blob(['through a url\n']), 'ignored.txt')
    const up = await fetch(await sbx.uploadUrl(`${dir}/u.txt`), { method: 'POST', body: form })
    assert.equal(up.status, 200)
    const down = await fetch(await sbx.downloadUrl(`${dir}/u.txt`))
    assert.equal(down.status, 200)
    assert.equal(await down.text(), 'through a url\n')
  })
})

describe('watch', () => {
  const kinds = (events, name) => events.filter((e) => e.name === name).map((e) => e.type)
  const sawWrite = (events, name) => () =>
    events.some((e) => e.name === name && e.type === Ev.WRITE)

  test('a new file yields CREATE, CHMOD, WRITE', async () => {
    const dir = await freshDir()
    const events = []
    const h = await sbx.files.watchDir(dir, (e) => events.push(e))
    try {
      await sbx.files.write(`${dir}/new.txt`, 'data')
      await sbx.files.write(`${dir}/zz-sentinel`, 's')
      await waitUntil(sawWrite(events, 'zz-sentinel'), 'sentinel WRITE event')
    } finally {
      await h.stop()
    }
    assert.deepEqual(kinds(events, 'new.txt'), [Ev.CREATE, Ev.CHMOD, Ev.WRITE])
  })

  test('recursive watch follows a new subdirectory', async () => {
    const dir = await freshDir()
    const events = []
    const h = await sbx.files.watchDir(dir, (e) => events.push(e), { recursive: true })
    try {
      await sbx.files.makeDir(`${dir}/later`)
      await sbx.files.write(`${dir}/later/file.txt`, 'right away')
      await sbx.files.write(`${dir}/later/zz-sentinel`, 's')
      await waitUntil(sawWrite(events, 'later/zz-sentinel'), 'sentinel WRITE event')
    } finally {
      await h.stop()
    }
    assert.equal(kinds(events, 'later')[0], Ev.CREATE)
    const got = kinds(events, 'later/file.txt')
    assert.equal(got[0], Ev.CREATE)
    assert.ok(got.includes(Ev.WRITE), JSON.stringify(got))
  })

  test('watching a missing directory fails', async () => {
    const dir = await freshDir()
    await assert.rejects(sbx.files.watchDir(`${dir}/missing`, () => {}), FileNotFoundError)
  })
})
