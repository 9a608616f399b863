"""A client that resumes (kagglehub, curl -C -, wget -c) sends `Range: bytes=N-` and appends what
comes back: a 200 with the whole archive would corrupt its file. A Range on a miss or a join is
answered 206 once the fetch is verified, never 200."""

from __future__ import annotations

import threading


def test_a_range_on_a_miss_gets_206_of_the_verified_archive_not_a_200(proxy, origin, archives):
    model = origin.register(archives.padded)
    body = archives.padded.read_bytes()

    status, headers, received = proxy.get(f"/{model.handle}", headers={"Range": "bytes=1000-"})

    assert (status, len(received)) == (206, len(body) - 1000)
    assert received == body[1000:]
    assert headers["Content-Range"] == f"bytes 1000-{len(body) - 1}/{len(body)}"
    assert origin.object_gets(model) == 1


def test_a_range_that_joins_a_running_fetch_gets_206(proxy, origin, held_stand_in, stand_in):
    body = stand_in.read_bytes()
    path = f"/{held_stand_in.handle}"
    answers = {}

    def ask(name: str, headers: dict) -> None:
        answers[name] = proxy.get(path, headers=headers)

    first = threading.Thread(target=ask, args=("whole", {}))
    first.start()
    proxy.wait_for_metric("hubproxy_flight_readers", 1)
    joining = threading.Thread(target=ask, args=("range", {"Range": f"bytes={len(body) - 10}-"}))
    joining.start()
    proxy.wait_for_metric("hubproxy_flight_readers", 2)
    origin.wait_held(1)  # released before the transfer reaches the pause, it would pause for good
    origin.release()
    for thread in (first, joining):
        thread.join(timeout=120)

    assert answers["whole"][0] == 200 and answers["whole"][2] == body
    status, headers, received = answers["range"]
    assert (status, headers["X-Cache"], received) == (206, "JOIN", body[-10:])
