"""The Flask view in docs/client.md, run as written, against the real broker."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from conftest import wait_for

DOC = Path(__file__).resolve().parents[1] / "docs" / "client.md"
if not DOC.exists():   # the tests may sit one directory deeper than the docs' parent
    DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def load_example(tmp_path, queue: str):
    """The doc's block as the module a user would save it as, with a queue of the test's
    own instead of "thumbnails" (two test runs go at once on one broker)."""
    block = flask_block()
    assert block.count('queue="thumbnails"') == 1
    path = tmp_path / "thumbnail_app.py"
    path.write_text(block.replace('queue="thumbnails"', f'queue="{queue}"'))
    spec = importlib.util.spec_from_file_location("thumbnail_app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["thumbnail_app"] = module
    spec.loader.exec_module(module)
    return module


def flask_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    (block,) = [b for b in blocks if "flask.Flask" in b]
    return block


def test_the_documented_view_enqueues_and_answers_202(amqp, qname, tmp_path):
    amqp.declare(qname)
    example = load_example(tmp_path, qname)
    web = example.app.test_client()
    answer = web.post("/thumbnails", data=b"resize 42")
    assert answer.status_code == 202
    message_id = answer.get_json()["id"]
    ((props, body),) = wait_for(lambda: amqp.get_all(qname), 5, what="the task")
    assert (props.message_id, body) == (message_id, b"resize 42")
    example.client.close()


def test_the_documented_view_answers_503_when_the_queue_is_missing(broker, tmp_path):
    example = load_example(tmp_path, f"missing-{tmp_path.name}")
    answer = example.app.test_client().post("/thumbnails", data=b"x")
    assert answer.status_code == 503 and "unroutable" in answer.get_json()["error"]
    example.client.close()
