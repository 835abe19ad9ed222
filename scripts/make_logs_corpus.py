#!/usr/bin/env python3
"""Make the `logs` example corpus: a fourth domain for examples/nexus.ron.

The three corpora of scripts/train_examples.py (code, law, math) train the seed model
and its branches; examples/nexus.ron adds an expert for a domain none of them has seen.
This script writes that domain's text, synthetic service logs, one event per line:

    2024-03-05T12:01:33Z INFO  api-3 GET /v1/orders/812 200 35ms user=u4417
    2024-03-05T12:01:34Z WARN  worker-1 job 9120 retrying after timeout (attempt 2/5)
    2024-03-05T12:01:36Z ERROR db-2 connection reset by peer 10.0.3.17:5432

Timestamps advance by 0 to 4 seconds a line; levels, services, routes, statuses,
latencies and messages are drawn with Python's `random`: seed 4242 for
examples/data/logs/train.txt (about 100 kB), seed 9191 for eval.txt (about 20 kB),
which starts on another day and leaves out lines that occur in train. Standard
library only; the same bytes on every run. No licence applies.

Usage: python3 scripts/make_logs_corpus.py
"""

import datetime
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "logs"
TRAIN_SEED, EVAL_SEED = 4242, 9191
TRAIN_BYTES, EVAL_BYTES = 100_000, 20_000

SERVICES = ["api", "worker", "db", "cache", "auth", "gateway"]
ROUTES = ["/v1/orders", "/v1/users", "/v1/items", "/v2/search", "/v1/carts", "/health"]
METHODS = ["GET", "GET", "GET", "POST", "PUT", "DELETE"]
ERRORS = [
    "connection reset by peer 10.0.{a}.{b}:5432",
    "query timed out after {ms}ms",
    "disk usage at {pct}% on /var/lib/data",
    "failed to acquire lock on table orders",
    "upstream returned 502 for {route}",
]
WARNINGS = [
    "job {job} retrying after timeout (attempt {n}/5)",
    "slow request {route} took {ms}ms",
    "cache miss ratio {pct}% over the last minute",
    "token for user=u{user} expires in {n} minutes",
]
INFOS = [
    "job {job} finished in {ms}ms",
    "cache warmed with {job} keys",
    "user=u{user} logged in from 192.168.{a}.{b}",
    "config reloaded, {n} services healthy",
]


def line(rng, when):
    """One log line at time `when`."""
    service = f"{rng.choice(SERVICES)}-{rng.randint(1, 8)}"
    fields = dict(
        a=rng.randint(0, 255), b=rng.randint(1, 254), ms=rng.randint(2, 4000),
        pct=rng.randint(50, 99), job=rng.randint(1000, 9999), n=rng.randint(1, 5),
        user=rng.randint(1000, 9999), route=f"{rng.choice(ROUTES)}/{rng.randint(1, 999)}",
    )
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    roll = rng.random()
    if roll < 0.55 and service.startswith(("api", "gateway")):
        status = rng.choice([200, 200, 200, 201, 204, 304, 400, 404, 500])
        route = fields["route"]
        return (f"{stamp} INFO  {service} {rng.choice(METHODS)} {route} {status} "
                f"{rng.randint(1, 900)}ms user=u{fields['user']}")
    if roll < 0.75:
        return f"{stamp} INFO  {service} {rng.choice(INFOS).format(**fields)}"
    if roll < 0.92:
        return f"{stamp} WARN  {service} {rng.choice(WARNINGS).format(**fields)}"
    return f"{stamp} ERROR {service} {rng.choice(ERRORS).format(**fields)}"


def lines(seed, nbytes, start, exclude=frozenset()):
    """Lines (with newlines) from `start` until `nbytes` bytes, none in `exclude`."""
    rng = random.Random(seed)
    when, out, size = start, [], 0
    while size < nbytes:
        when += datetime.timedelta(seconds=rng.randint(0, 4))
        text = line(rng, when) + "\n"
        if text in exclude:
            continue
        out.append(text)
        size += len(text)
    return out


def main():
    train = lines(TRAIN_SEED, TRAIN_BYTES, datetime.datetime(2024, 3, 5, 12, 0, 0))
    evaluation = lines(EVAL_SEED, EVAL_BYTES, datetime.datetime(2024, 6, 11, 7, 30, 0),
                       frozenset(train))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train.txt").write_text("".join(train), encoding="utf-8")
    (OUT / "eval.txt").write_text("".join(evaluation), encoding="utf-8")
    print(f"logs: {len(train)} train lines, {len(evaluation)} eval lines in {OUT}")


if __name__ == "__main__":
    main()
