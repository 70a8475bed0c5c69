"""The commands around the server: `asyncllm serve` (key from the environment, SIGTERM drains
and exits 0), `asyncllm chat` (history, Ctrl-C, Ctrl-D), every option's help, and the
server staying an optional extra."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asyncllm import LLM, SamplingParams
from asyncllm.cli import build_parser
from asyncllm.server.serve import SERVE_DECODE_STEPS, serving_overrides
from tests.models import assert_reads_as_a_story
from tests.servers import free_port, iter_sse, with_chat_template

pytest.importorskip("uvicorn")

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ---- help --------------------------------------------------------------------------------------


def subcommands(
    parser: argparse.ArgumentParser, path: str = "asyncllm"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subcommands(child, f"{path} {name}")


def test_every_option_of_every_command_is_explained() -> None:
    commands = dict(subcommands(build_parser()))
    assert {"asyncllm generate", "asyncllm chat", "asyncllm serve", "asyncllm bench serve"} <= set(
        commands
    )
    for path, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), (
                f"{path} {action.option_strings} has no help"
            )


def test_serve_help_lists_the_server_and_engine_options() -> None:
    from asyncllm.server.app import DEFAULT_MAX_EVENT_RATE

    text = dict(subcommands(build_parser()))["asyncllm serve"].format_help()
    assert f"(default: {DEFAULT_MAX_EVENT_RATE:.0f})" in " ".join(text.split())
    for option in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--max-num-seqs",
        "--shutdown-timeout",
        "ASYNCLLM_API_KEY",
        "127.0.0.1",
    ):
        assert option in text


# ---- serve -------------------------------------------------------------------------------------


def start_server(*options: str, key: str = "env-key") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncllm",
            "serve",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--num-kv-blocks",
            "256",
            "--log-level",
            "warning",
            *options,
        ],
        env={**ENV, "ASYNCLLM_API_KEY": key},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, "the server exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.kill()
        server.wait()


def test_serve_runs_four_decode_steps_a_launch_unless_told_otherwise() -> None:
    assert serving_overrides({})["num_decode_steps"] == SERVE_DECODE_STEPS == 4
    given = {"num_decode_steps": 1, "max_num_seqs": 8}
    assert serving_overrides(given) == given


def test_serve_takes_its_key_from_the_environment_and_drains_on_sigterm() -> None:
    server, url = start_server()
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer env-key"})
        assert models.json()["data"][0]["id"] == "tiny-qwen3"
        body = {
            "prompt": "Once upon a time",
            "max_tokens": 300,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json=body,
            timeout=120,
            headers={"Authorization": "Bearer env-key"},
        ) as response:
            events = iter_sse(response)
            next(events)
            server.send_signal(signal.SIGTERM)
            refused = False
            deadline = time.monotonic() + 10
            while not refused and time.monotonic() < deadline:  # new connections: refused
                try:
                    httpx.get(f"{url}/health", timeout=1)
                    time.sleep(0.05)
                except httpx.ConnectError:
                    refused = True
            rest = list(events)
        assert refused
        assert rest[-1] == "[DONE]"
        assert '"completion_tokens":300' in rest[-2]  # the whole answer came through
        assert server.wait(timeout=60) == 0
    finally:
        stop(server)


def test_sigterm_aborts_what_outlives_the_shutdown_timeout() -> None:
    server, url = start_server("--shutdown-timeout", "0.5")
    try:
        body = {
            "prompt": "Once upon a time",
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        }
        received: list[str] = []
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json=body,
            timeout=120,
            headers={"Authorization": "Bearer env-key"},
        ) as response:
            events = iter_sse(response)
            received.append(next(events))
            server.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):  # cut off mid-stream
                received.extend(events)
        assert "[DONE]" not in received
        assert server.wait(timeout=60) == 0
    finally:
        stop(server)


# ---- chat --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_dir(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random model (it never emits EOS: every reply runs to --max-tokens), with a template."""
    return with_chat_template(random_model_dir, tmp_path_factory.mktemp("random-chat"))


def chat(model: Path, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncllm",
            "chat",
            str(model),
            "--device",
            "cpu",
            "--num-kv-blocks",
            "128",
            *options,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        # A shell without job control starts background jobs (CI runners, `cmd &`) with
        # Ctrl-C ignored, which children inherit and Python then leaves ignored: give the
        # chat the terminal's default back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_chat_streams_replies_and_keeps_the_conversation(chat_dir: Path) -> None:
    process = chat(chat_dir, "--max-tokens", "12", "--system", "Be brief.")
    out, err = process.communicate("Hello\n\nTell me more\n", timeout=120)
    assert process.returncode == 0, err
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    with LLM(str(chat_dir), device="cpu", num_kv_blocks=128) as llm:
        greedy = SamplingParams(max_tokens=12, temperature=0)
        tokenizer = llm.engine.tokenizer
        first = llm.generate([tokenizer.apply_chat_template(history)], greedy)[0].text
        history += [
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Tell me more"},
        ]
        second = llm.generate([tokenizer.apply_chat_template(history)], greedy)[0].text
    # A prompt, the first reply; a prompt for the empty line; the second reply (which saw
    # the first in its history); a last prompt, ended by Ctrl-D with a newline.
    assert out == f"> {first}\n> > {second}\n> \n"


def test_a_turn_that_does_not_fit_is_refused_and_the_chat_goes_on(chat_dir: Path) -> None:
    process = chat(chat_dir, "--max-tokens", "40", "--max-model-len", "64")
    out, err = process.communicate("x" * 40 + "\nHi\n", timeout=120)
    assert process.returncode == 0
    assert err.count("max_model_len 64") == 1
    with LLM(str(chat_dir), device="cpu", num_kv_blocks=128) as llm:
        prompt = llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
        reply = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0].text
    assert out == f"> > {reply}\n> \n"  # the refused turn left no trace in the history


def test_ctrl_c_stops_one_reply_and_ctrl_d_quits(chat_dir: Path) -> None:
    # A reply far longer than the test needs to see it start (the pipe may run ahead of a
    # busy machine's reader), read in whole chunks as they come.
    process = chat(chat_dir, "--max-tokens", "400")
    assert process.stdin is not None and process.stdout is not None
    output: list[str] = []
    stdout = process.stdout.fileno()
    reader = threading.Thread(
        target=lambda: output.extend(
            chunk.decode(errors="replace") for chunk in iter(lambda: os.read(stdout, 4096), b"")
        )
    )
    reader.start()
    process.stdin.write("Tell me a very long story\n")
    process.stdin.flush()
    deadline = time.monotonic() + 120
    while len("".join(output)) < len("> ") + 5:  # the reply has started
        assert time.monotonic() < deadline, "no reply"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    while "[stopped]" not in "".join(output):
        assert time.monotonic() < deadline, f"Ctrl-C did not stop the reply: {output!r}"
        time.sleep(0.01)
    process.stdin.write("Again\n")
    process.stdin.close()  # Ctrl-D
    assert process.wait(timeout=120) == 0
    reader.join()
    text = "".join(output)
    before, after = text.split(" [stopped]\n")
    assert len(before) < 300  # the first reply was cut short
    assert after.startswith("> ") and after.count("> ") == 2  # a second reply, then the end
    assert len(after) > len("> \n> \n")


def test_chat_with_the_embedded_model_tells_stories_and_follows_up() -> None:
    ask, follow_up = "Tell me a story about a cat named Tom.", "Make it shorter."
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncllm", "chat", "--device", "cpu", "--num-kv-blocks", "128"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )  # no model: the embedded one, which ships a chat template
    out, err = process.communicate(f"{ask}\n{follow_up}\n", timeout=120)
    assert process.returncode == 0, err
    history = [{"role": "user", "content": ask}]
    with LLM(None, device="cpu", num_kv_blocks=128) as llm:
        greedy = SamplingParams(max_tokens=512, temperature=0)  # the command's defaults
        tokenizer = llm.engine.tokenizer
        first = llm.generate([tokenizer.apply_chat_template(history)], greedy)[0]
        history += [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": follow_up},
        ]
        second = llm.generate([tokenizer.apply_chat_template(history)], greedy)[0]
    assert out == f"> {first.text}\n> {second.text}\n> \n"
    # Each reply is a story that ended its turn; the second heeded the first.
    assert first.finish_reason == second.finish_reason == "stop"
    assert_reads_as_a_story(first.text, ask)
    assert_reads_as_a_story(second.text, follow_up)
    assert "Tom" in first.text and "Tom" in second.text
    assert len(second.text) < len(first.text)


def test_chat_refuses_a_model_without_a_chat_template(random_model_dir: Path) -> None:
    process = chat(random_model_dir)
    _out, err = process.communicate("Hello\n", timeout=120)
    assert process.returncode == 2
    assert "no chat template" in err


# ---- an optional extra -------------------------------------------------------------------------


def test_importing_asyncllm_does_not_import_the_server() -> None:
    code = (
        "import sys, asyncllm\n"
        "assert not {'fastapi', 'uvicorn', 'asyncllm.server'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True, timeout=60)


def test_the_server_without_its_extra_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None\n"  # as if it were not installed
        "try:\n    import asyncllm.server\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "pip install 'asyncllm[server]'" in done.stdout
