"""Drives arca-api's template registry with the official E2B Python SDK's
`Template` builder.

Run by tests/sdk.rs with E2B_API_URL/E2B_API_KEY pointing at a test server
whose node and builder are fakes: the builder logs a line per step and fails
a step whose arguments contain FAIL.
"""

import inspect
import os
import tempfile
import traceback

import e2b
from e2b import BuildException, Sandbox, Template

version = e2b.__version__ if hasattr(e2b, "__version__") else "?"

ctx = tempfile.mkdtemp()
with open(os.path.join(ctx, "hello.txt"), "w") as f:
    f.write("hello\n")

# A build with a COPY: the archive is uploaded once, through our link.
logs = []
template = (
    Template(file_context_path=ctx)
    .from_base_image()
    .copy("hello.txt", "/home/user/hello.txt")
    .run_cmd("echo built")
    .set_envs({"GREETING": "hi"})
    .set_start_cmd("sleep infinity", "true")
)
info = Template.build(template, "sdk-app", on_build_logs=logs.append)
messages = [str(getattr(entry, "message", entry)) for entry in logs]
assert any("Uploaded 'hello.txt'" in m for m in messages), messages
assert any("step 2: RUN echo built" in m for m in messages), messages
assert any("build done" in m for m in messages), messages
assert info.name == "sdk-app", info
assert Template.exists("sdk-app")
assert not Template.exists("sdk-missing")

# The same files again: present, so the upload is skipped.
logs.clear()
Template.build(template, "sdk-app:v2", on_build_logs=logs.append)
messages = [str(getattr(entry, "message", entry)) for entry in logs]
assert any("Skipping upload of 'hello.txt'" in m for m in messages), messages

# Sandboxes start from it; templateID is the id, not the name.
sbx = Sandbox.create("sdk-app")
detail = Sandbox.get_info(sbx.sandbox_id)
assert detail.template_id == info.template_id, (detail, info)
assert sbx.kill() is True

# Tags.
tag_info = Template.assign_tags("sdk-app:v2", ["prod"])
assert tag_info.tags == ["prod"], tag_info
tags = {t.tag: t.build_id for t in Template.get_tags("sdk-app")}
assert set(tags) == {"default", "v2", "prod"}, tags
assert tags["prod"] == tags["v2"] != tags["default"], tags
Template.remove_tags("sdk-app", ["prod"])
tags = {t.tag for t in Template.get_tags("sdk-app")}
assert tags == {"default", "v2"}, tags

# A failing step surfaces as BuildException pointing at that step's line.
bad = Template().from_template("base")
bad = bad.run_cmd("echo fine")
fail_line = inspect.currentframe().f_lineno + 1
bad = bad.run_cmd("make FAIL")
try:
    Template.build(bad, "sdk-bad")
    raise AssertionError("a failing build must raise")
except BuildException as e:
    assert "step 2 failed" in str(e), str(e)
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(e.__traceback__)
        if frame.filename == __file__
    ]
    assert fail_line in lines, (fail_line, lines)
# It never became usable.
try:
    Sandbox.create("sdk-bad")
    raise AssertionError("a template without a finished build must not start")
except e2b.SandboxException as e:
    assert "no finished build" in str(e), str(e)

# A name taken by nobody else but built into Arca.
try:
    Template.build(Template().from_template("base"), "base")
    raise AssertionError("building the name 'base' must fail")
except BuildException as e:
    assert "409" in str(e), str(e)

# delete_snapshot is DELETE /templates/{id}: True, then False.
assert Sandbox.delete_snapshot(info.template_id) is True
assert Sandbox.delete_snapshot(info.template_id) is False
assert not Template.exists("sdk-app")
print("sdk templates ok", version)
