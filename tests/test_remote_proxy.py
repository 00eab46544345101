"""The remote backend behind a proxy named in the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY,
NO_PROXY, which httpx reads): a cancel while the connection to the proxy is being made ends it at
once, as without a proxy; NO_PROXY is honoured as httpx does it. Real local sockets; no waits on
timings, only generous bounds that a hang would pass."""

from __future__ import annotations

import os
import socket
import sys
import threading
from types import SimpleNamespace

import pytest
from remote_helpers import FakeServer, Reply, dripping_server, fixture, refusing_port, tls_server, unanswered_port
from proxy_helpers import error_page_proxy, tunnel_proxy

from internvl_chat.chat import remote_http
from internvl_chat.chat.remote import RemoteConversation
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.errors import RemoteError, UsageError
from internvl_chat.threads import start_worker

CONNECTING_WAIT_S = 60.0  # generous; a connect that the cancel does not end goes on for minutes
STOP = b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'


@pytest.fixture
def proxy_env(monkeypatch):
    """Sets proxy variables after clearing any the test machine has (either case: urllib, which
    httpx asks, prefers the lower-case one)."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)

    def set_env(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.mark.parametrize(
    ("variable", "server"),
    [("HTTP_PROXY", "http://gpu-box.invalid:8000/v1"),
     ("HTTPS_PROXY", "https://gpu-box.invalid:8000/v1"),
     ("ALL_PROXY", "http://gpu-box.invalid:8000/v1")],
)  # fmt: skip
def test_a_cancel_while_connecting_to_a_proxy_ends_the_attempt_at_once(monkeypatch, proxy_env, variable, server):
    """Behind a proxy, httpx connects through another pool than its default one; a cancel while the
    connection to the proxy was being made (no socket to shut yet) waited for the connect timeout
    (30 s; an hour here, which the kernel's SYN retries end after about two minutes)."""
    monkeypatch.setattr(remote_http, "CONNECT_TIMEOUT_S", 3600.0)
    with unanswered_port() as port:
        proxy_env(**{variable: f"http://127.0.0.1:{port}"})
        client = remote_http.ApiClient(server, "", 3600)
        conv = RemoteConversation(client, "m", "generic", params=SamplingParams(max_new_tokens=8))
        cancel = threading.Event()
        ports: list = []
        trace = client.trace

        def spy(event: str, info: dict) -> None:
            if event == "connection.connect_tcp.started":
                ports.append(info.get("port"))
                cancel.set()
            trace(event, info)

        client.trace = spy
        outcome: list = []
        asking = start_worker(lambda: outcome.append(list(conv.ask("hi", cancel=cancel))), "test-ask")
        asking.join(CONNECTING_WAIT_S)
        assert not asking.is_alive(), "the cancel did not end the connect to the proxy"
        assert ports == [port]  # the connect was the proxy's
        assert outcome and outcome[0][-1]["finish_reason"] == "cancelled"
        client.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_no_proxy_still_reaches_the_server_directly(proxy_env, host):
    """A host that NO_PROXY names is connected to directly, as httpx does it, even with a proxy for
    everything else (here one that never answers)."""
    with unanswered_port() as port, FakeServer(fixture("vllm/models.json")) as server:
        proxy_env(HTTP_PROXY=f"http://127.0.0.1:{port}", ALL_PROXY=f"http://127.0.0.1:{port}", NO_PROXY=f"example.org,{host}")
        url = server.url.replace("127.0.0.1", host)
        server.chat(Reply.sse(STOP))
        conv = RemoteConversation.connect(url, timeout=60, params=SamplingParams(max_new_tokens=8))
        events = list(conv.ask("hi"))
        assert "".join(e["text"] for e in events) == "ok"
        assert len(server.chat_bodies()) == 1
        conv.client.close()


@pytest.mark.parametrize("variable", ["ALL_PROXY", "all_proxy", "HTTPS_PROXY"])
def test_a_socks_proxy_without_socksio_is_one_line_that_says_what_to_do(monkeypatch, proxy_env, variable):
    """httpx needs the optional socksio package for a SOCKS proxy and raised an ImportError as the
    client was made: a traceback instead of the answer."""
    monkeypatch.setitem(sys.modules, "socksio", None)  # not installed (an import of it fails)
    proxy_env(**{variable: "socks5://me:s3cret@127.0.0.1:1080"})
    with pytest.raises(UsageError) as err:
        RemoteConversation.connect("http://gpu-box.invalid:8000/v1")
    line = str(err.value)
    assert line == (f"{variable} names a SOCKS proxy, which needs the socksio package: "
                    f"pip install 'httpx[socks]', or unset {variable}")  # fmt: skip
    assert err.value.exit_code == 2


@pytest.mark.parametrize("value", ["ftp://me:s3cret@127.0.0.1:21", "socks4://127.0.0.1:1080"])
def test_a_proxy_url_httpx_cannot_use_is_blamed_not_the_server_url(proxy_env, value):
    """httpx refuses the proxy's URL as the client is made; the line blamed --server, and showed
    the proxy's user name."""
    proxy_env(ALL_PROXY="http://127.0.0.1:9", https_proxy=value)
    with pytest.raises(UsageError) as err:
        RemoteConversation.connect("http://gpu-box.invalid:8000/v1")
    line = str(err.value)
    assert line.startswith("the proxy in https_proxy is not a usable URL") and line.endswith("fix or unset https_proxy")
    assert "--server" not in line and "s3cret" not in line and "me:" not in line
    assert err.value.exit_code == 2 and "\n" not in line


def test_a_bad_server_url_is_still_blamed_with_a_proxy_set(proxy_env):
    proxy_env(HTTP_PROXY="http://127.0.0.1:9")
    with pytest.raises(UsageError, match=r"pass --server http://HOST:PORT/v1$"):
        RemoteConversation.connect("http://xn--/v1")


def test_a_socket_connected_through_a_socks_proxy_is_one_the_client_can_shut():
    """httpcore traces a SOCKS proxy's connects as `socks.connect_tcp`, not `connection.…`: their
    sockets were not among the client's, so an abort before the head, or a head that came too late
    (HeadWatch), did not shut them and waited for the read timeout. (No SOCKS proxy runs here: it
    needs socksio, which the tests do not install.)"""
    client = remote_http.ApiClient("http://gpu-box.invalid:8000/v1", "", 60)
    with socket.socket() as sock:
        stream = SimpleNamespace(get_extra_info=lambda name: sock if name == "socket" else None)
        client.trace("socks.connect_tcp.complete", {"return_value": stream})
        assert sock in client._sockets
    client.close()


def test_a_cancel_while_a_proxy_keeps_the_head_ends_the_answer_at_once(monkeypatch, proxy_env):
    """Connected to the proxy, the request sent, no head comes: the cancel shuts the connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections are made by the kernel, and never answered
        proxy_env(HTTP_PROXY="http://127.0.0.1:%d" % listener.getsockname()[1])
        client = remote_http.ApiClient("http://gpu-box.invalid:8000/v1", "", 3600)
        conv = RemoteConversation(client, "m", "generic", params=SamplingParams(max_new_tokens=8))
        cancel = threading.Event()
        trace = client.trace

        def spy(event: str, info: dict) -> None:
            trace(event, info)
            if event == "http11.send_request_body.complete":
                cancel.set()

        client.trace = spy
        outcome: list = []
        asking = start_worker(lambda: outcome.append(list(conv.ask("hi", cancel=cancel))), "test-ask")
        asking.join(CONNECTING_WAIT_S)
        assert not asking.is_alive(), "the cancel did not end the wait for the proxy's head"
        assert outcome and outcome[0][-1]["finish_reason"] == "cancelled"
        client.close()


@pytest.mark.parametrize(("variable", "server"), [("HTTP_PROXY", "http://gpu-box.invalid:8000/v1"),
                                                  ("all_proxy", "https://gpu-box.invalid/v1")])  # fmt: skip
def test_a_proxy_that_cannot_be_reached_is_blamed_not_the_server(proxy_env, variable, server):
    """The line said "is the server running? check --server" when the proxy was down."""
    with refusing_port() as port:
        proxy_env(**{variable: f"http://127.0.0.1:{port}"})
        with pytest.raises(RemoteError) as err:
            RemoteConversation.connect(server)
    line = str(err.value)
    assert line.startswith(f"cannot reach {server} through the proxy in {variable} (")
    assert line.endswith("; check the proxy, or add the server's host to NO_PROXY")


def test_a_proxy_that_refuses_the_tunnel_is_blamed_not_the_server(proxy_env):
    """An https server is reached through a tunnel (CONNECT) that the proxy may refuse."""
    with FakeServer(fixture("vllm/models.json")) as proxy:  # answers CONNECT with 501
        proxy_env(HTTPS_PROXY=proxy.url.removesuffix("/v1"))
        with pytest.raises(RemoteError, match=r"^cannot reach https://gpu-box\.invalid/v1 through the proxy in HTTPS_PROXY \("):
            RemoteConversation.connect("https://gpu-box.invalid/v1")


def test_a_server_in_no_proxy_that_is_down_is_still_the_servers_fault(proxy_env):
    with refusing_port() as port, unanswered_port() as proxy_port:
        proxy_env(ALL_PROXY=f"http://127.0.0.1:{proxy_port}", NO_PROXY="127.0.0.1")
        with pytest.raises(RemoteError, match=r"^cannot connect to http://127\.0\.0\.1:\d+/v1 .*is the server running\?"):
            RemoteConversation.connect(f"http://127.0.0.1:{port}/v1")


@pytest.fixture
def answering_proxy():
    """A proxy that answers every request with the status in `status[0]` and an HTML page, as a
    proxy's own error page."""
    status = [403]
    with error_page_proxy(lambda head: status[0], CONNECTING_WAIT_S) as port:
        yield port, status


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "all_proxy"])
def test_a_plain_http_proxy_that_asks_for_credentials_is_blamed_not_the_server(proxy_env, answering_proxy, variable):
    """Only a proxy sends 407; it was "the server answered 407 …; check the request"."""
    port, status = answering_proxy
    status[0] = 407
    proxy_env(**{variable: f"http://me:wrong@127.0.0.1:{port}"})
    with pytest.raises(RemoteError) as err:
        RemoteConversation.connect("http://gpu-box.invalid:8000/v1")
    line = str(err.value)
    assert line == (f"the proxy in {variable} asks for credentials (407 Proxy Authentication Required); put the right "
                    "ones in its URL (http://USER:PASSWORD@HOST:PORT), or add the server's host to NO_PROXY")  # fmt: skip


def test_a_proxy_s_error_page_through_a_tunnel_is_blamed_not_the_server(proxy_env, answering_proxy):
    """A refused CONNECT (httpx's ProxyError) is the proxy's, whatever its status and page."""
    port, status = answering_proxy
    for status[0] in (403, 407, 502):
        proxy_env(HTTPS_PROXY=f"http://me:s3cret@127.0.0.1:{port}")
        with pytest.raises(RemoteError) as err:
            RemoteConversation.connect("https://gpu-box.invalid/v1")
        line = str(err.value)
        assert line.startswith(f"cannot reach https://gpu-box.invalid/v1 through the proxy in HTTPS_PROXY ({status[0]} "), line
        assert "s3cret" not in line and "the server answered" not in line


def test_a_407_without_a_proxy_is_still_the_servers_answer(proxy_env):
    with FakeServer() as server:
        server.chat(Reply.json({"error": {"message": "who?"}}, status=407))
        client = remote_http.ApiClient(server.url, "", 60)
        conv = RemoteConversation(client, "m", "generic", params=SamplingParams(max_new_tokens=8))
        with pytest.raises(RemoteError, match=r"^the server answered 407"):
            list(conv.ask("hi"))
        client.close()


def test_a_plain_http_proxys_error_page_says_its_status_and_text(proxy_env, answering_proxy):
    """A plain-HTTP proxy's own page cannot be told from the server's answer: the line says both may
    have sent it, with the status and the page's text, not its markup."""
    port, status = answering_proxy
    status[0] = 502
    proxy_env(HTTP_PROXY=f"http://127.0.0.1:{port}")
    with pytest.raises(RemoteError) as err:
        RemoteConversation.connect("http://gpu-box.invalid:8000/v1")
    assert str(err.value) == ("the server (or a proxy in front of it) answered 502 Bad Gateway: the proxy says no; check "
                              "that the server is running (and that the proxy reaches it)")  # fmt: skip


def test_an_untrusted_certificate_through_a_proxy_is_the_servers_not_the_proxys(proxy_env):
    """Through an HTTPS_PROXY tunnel, a server certificate the client does not trust read "cannot
    reach … through the proxy in HTTPS_PROXY; check the proxy": the proxy had done its part."""
    with tls_server() as port, tunnel_proxy(port) as proxy_port:
        proxy_env(HTTPS_PROXY=f"http://127.0.0.1:{proxy_port}")
        with pytest.raises(RemoteError) as err:
            RemoteConversation.connect("https://gpu-box.invalid/v1")
    line = str(err.value)
    assert line.startswith("cannot connect to https://gpu-box.invalid/v1: its TLS certificate is not trusted ("), line
    assert line.endswith("; check the host name in --server, or name the CA that signed it in SSL_CERT_FILE"), line


def test_a_plain_http_server_through_a_proxy_s_tunnel_says_to_use_http(proxy_env):
    with FakeServer(fixture("vllm/models.json")) as server:
        with tunnel_proxy(int(server.url.rsplit(":", 1)[1].removesuffix("/v1"))) as proxy_port:
            proxy_env(HTTPS_PROXY=f"http://127.0.0.1:{proxy_port}")
            with pytest.raises(RemoteError) as err:
                RemoteConversation.connect("https://gpu-box.invalid/v1")
    assert str(err.value) == "cannot connect to https://gpu-box.invalid/v1: the server does not speak TLS; use http:// in --server"


def test_an_https_proxy_s_own_untrusted_certificate_is_still_the_proxys(proxy_env):
    """The handshake with an https:// proxy is the proxy's: only the one inside its tunnel is the server's."""
    with tls_server() as port:
        proxy_env(HTTPS_PROXY=f"https://127.0.0.1:{port}")
        with pytest.raises(RemoteError) as err:
            RemoteConversation.connect("https://gpu-box.invalid/v1")
    line = str(err.value)
    assert line.startswith("cannot reach https://gpu-box.invalid/v1 through the proxy in HTTPS_PROXY ("), line
    assert "CERTIFICATE_VERIFY_FAILED" in line, line


@pytest.mark.parametrize(("variable", "server"), [("HTTPS_PROXY", "https://gpu-box.invalid/v1"),
                                                  ("HTTP_PROXY", "http://gpu-box.invalid:8000/v1")])
def test_a_proxy_variable_naming_a_port_that_speaks_no_http_blames_the_proxy(proxy_env, variable, server):
    """A proxy variable at an SSH port said "what answers at https://gpu-box.invalid/v1 is not an
    HTTP server; check --server": the server was never reached."""
    with dripping_server(b"SSH-2.0-OpenSSH_9.6\r\n", b"", seconds=5.0) as ssh:
        proxy_env(**{variable: ssh.removesuffix("/v1")})
        with pytest.raises(RemoteError) as err:
            RemoteConversation.connect(server)
    assert str(err.value) == (f"the proxy in {variable} does not speak HTTP (it began with: SSH-2.0-OpenSSH_9.6); "
                              "check its URL (its port), or add the server's host to NO_PROXY")  # fmt: skip
