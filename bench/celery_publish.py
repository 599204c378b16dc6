"""W4 for Celery: ``apply_async`` once per line of a file, with publisher confirms.

    python celery_publish.py --queue Q --file PATH

Celery's py-amqp transport waits for each confirm (``confirm_publish``), so this
is Celery's safe publishing path, comparable to workq-submit's guarantees.
"""

import argparse
import json
import os
import sys
import time

t0 = time.monotonic()
p = argparse.ArgumentParser()
p.add_argument("--queue", required=True)
p.add_argument("--file", required=True)
a = p.parse_args()
os.environ["BENCH_QUEUE"] = a.queue

from celery_app import app, stamp  # noqa: E402  (the queue must be set first)

app.conf.broker_transport_options = {"confirm_publish": True}
with open(a.file) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
with app.producer_or_acquire() as producer:
    for line in lines:
        stamp.apply_async((line,), producer=producer)
print(json.dumps({"published": len(lines), "seconds": time.monotonic() - t0}))
sys.exit(0)
