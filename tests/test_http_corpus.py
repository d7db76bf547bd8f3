"""The whole hostile-input corpus (tests/test_hostile.py CORPUS) through the real Cog server:
each request fails with an error naming its field, the worker stays READY, and the golden
request's pixels are the same after it as before."""

from __future__ import annotations

import pytest

from .helpers import payload, pixels
from .test_hostile import CORPUS, Bad
from .test_http import CogServer, image_bytes
from .test_http import server as server

pytestmark = pytest.mark.http

GOLDEN = payload(steps=2, prompt="a lighthouse")
# The server's request body limit is the transport's business; the corpus' megabyte bodies are
# covered in-process by test_hostile.py.
SENT = [bad for bad in CORPUS if len(bad.body) < 200_000]


@pytest.fixture(scope="module")
def golden(server: CogServer) -> bytes:
    return _golden(server)


def _golden(server: CogServer) -> bytes:
    prediction = server.predict(GOLDEN)
    assert prediction["status"] == "succeeded", prediction.get("error")
    return pixels(image_bytes(prediction)[0]).tobytes()


def test_most_of_the_corpus_goes_through_the_server() -> None:
    assert len(SENT) >= 60


@pytest.mark.parametrize("bad", SENT, ids=[bad.id for bad in SENT])
def test_hostile_request_through_the_server(server: CogServer, golden: bytes, bad: Bad) -> None:
    prediction = server.predict(bad.body, endpoint=bad.endpoint)
    assert prediction["status"] == "failed", bad.id
    error = str(prediction["error"])
    assert bad.field.lower() in error.lower(), error[:300]
    assert "Traceback" not in error
    assert server.settled_health() == "READY"
    assert _golden(server) == golden
