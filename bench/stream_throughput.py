"""Tensor stream throughput, client -> miner-like server on loopback, vs raw gRPC bytes.

One ``grpc.aio`` server on 127.0.0.1, in its own process as a miner is,
with two client-streaming methods:
``Tensors`` consumes a :func:`node.tensors.tensor_stream` of ``cnn-large``
weights with a :class:`node.tensors.TensorStreamReceiver` (size, layout,
digest, Ed25519 claim signature and role, finite values: what
``Miner.SubmitUpdate`` runs before its round checks), and ``Raw`` consumes
the same number of bytes as plain 1 MiB messages with no checks. The sender
(this process, as a client) times each call end to end, including building
the stream (serialising, digest, signing); both methods run the same
number of times, interleaved. The server listens twice, in plaintext and
with mutual TLS (miner-0's certificate of a fresh ``init_network``; the
sender presents client-000's), and the tensor stream is timed over both in
the same run.

python bench/stream_throughput.py --repeats 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch

from chain.digests import model_spec
from fl.config import RunConfig
from fl.models import build_model
from fl.seeds import torch_generator
from node.genesis import init_network, key_path
from node.identity import load_identity
from node.tensor_receiver import TensorStreamReceiver
from node.tensors import CHUNK_BYTES, UPDATE_KIND, tensor_stream
from node.tls import TLS_DIR, load_node_tls
from proto import llbcfl_pb2 as pb

SERVICE = "llbcfl.bench.Stream"


def handlers(*, spec, membership, limit: int) -> grpc.GenericRpcHandler:
    async def tensors(request_iterator, context) -> bytes:
        receiver = TensorStreamReceiver(
            expected=spec, max_total_bytes=limit, membership=membership, kind=UPDATE_KIND
        )
        async for part in request_iterator:
            receiver.add(part)
        received = receiver.finish()
        return received.digest

    async def raw(request_iterator, context) -> bytes:
        total = 0
        async for chunk in request_iterator:
            total += len(chunk)
        return total.to_bytes(8, "big")

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Tensors": grpc.stream_unary_rpc_method_handler(
                tensors, request_deserializer=pb.TensorStreamPart.FromString
            ),
            "Raw": grpc.stream_unary_rpc_method_handler(raw),
        },
    )


def serve(spec, membership_doc: dict, tls: tuple[bytes, bytes, bytes], port_pipe) -> None:
    """The receiving side, in a child process: serve until the parent closes the pipe."""
    from node.genesis import Genesis

    torch.set_num_threads(1)
    membership = Genesis.from_dict(membership_doc).membership

    async def run() -> None:
        options = [("grpc.max_receive_message_length", 4 << 20)]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers(
            (handlers(spec=spec, membership=membership, limit=64 << 20),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        ca, cert, key = tls
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        tls_port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        port_pipe.send((port, tls_port))
        await asyncio.get_running_loop().run_in_executor(None, port_pipe.recv)
        await server.stop(1.0)

    asyncio.run(run())


async def measure(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        genesis = init_network(Path(tmp), run=RunConfig(clients=1, model="cnn-large"), miners=4)
        identity = load_identity(key_path(Path(tmp), "client-000"))
        expected = genesis.protocol.tls_ca_sha256
        miner = load_node_tls(Path(tmp) / TLS_DIR, "miner-0", expected_ca=expected)
        client = load_node_tls(Path(tmp) / TLS_DIR, "client-000", expected_ca=expected)
    weights = build_model("cnn-large", generator=torch_generator(0, "bench")).state_dict()
    weights = {name: t.detach().clone() for name, t in weights.items()}
    size = sum(t.numel() * t.element_size() for t in weights.values())
    payload = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
    options = [("grpc.max_receive_message_length", 4 << 20)]
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(
        target=serve,
        args=(model_spec(weights), genesis.to_dict(), (miner.ca, miner.cert, miner.key), child_end),
        daemon=True,
    )
    child.start()
    tensor_s, raw_s, tls_s = [], [], []
    try:
        if not parent_end.poll(120):
            raise RuntimeError("the receiving process did not start")
        port, tls_port = parent_end.recv()
        creds = grpc.ssl_channel_credentials(
            root_certificates=client.ca, private_key=client.key, certificate_chain=client.cert
        )
        tls_options = [*options, ("grpc.ssl_target_name_override", "miner-0")]
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as ch,
            grpc.aio.secure_channel(f"127.0.0.1:{tls_port}", creds, options=tls_options) as tls_ch,
        ):
            send_tensors, send_tls = (
                c.stream_unary(
                    f"/{SERVICE}/Tensors", request_serializer=pb.TensorStreamPart.SerializeToString
                )
                for c in (ch, tls_ch)
            )
            send_raw = ch.stream_unary(f"/{SERVICE}/Raw")
            chunks = [payload[i : i + CHUNK_BYTES] for i in range(0, size, CHUNK_BYTES)]
            for i in range(repeats + 1):  # the first of each is a warm-up
                for send, times in ((send_tensors, tensor_s), (send_tls, tls_s)):
                    start = time.perf_counter()
                    stream = tensor_stream(
                        weights, identity=identity, kind=UPDATE_KIND, round=1, num_samples=600
                    )
                    await send(iter(stream), timeout=60)
                    if i:
                        times.append(time.perf_counter() - start)
                start = time.perf_counter()
                await send_raw(iter(chunks), timeout=60)
                if i:
                    raw_s.append(time.perf_counter() - start)
    finally:
        parent_end.send(None)
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    mb = size / 1e6
    return {
        "model": "cnn-large",
        "update_mb": round(mb, 2),
        "repeats": repeats,
        "receiver": "separate process",
        "tensor_stream_mb_per_s": round(mb / statistics.median(tensor_s), 1),
        "tensor_stream_ms_median": round(1e3 * statistics.median(tensor_s), 1),
        "raw_grpc_mb_per_s": round(mb / statistics.median(raw_s), 1),
        "raw_grpc_ms_median": round(1e3 * statistics.median(raw_s), 1),
        "ratio_to_raw": round(statistics.median(raw_s) / statistics.median(tensor_s), 3),
        "target_mb_per_s": 200,
        "tls_tensor_stream_mb_per_s": round(mb / statistics.median(tls_s), 1),
        "tls_tensor_stream_ms_median": round(1e3 * statistics.median(tls_s), 1),
        "tls_to_plaintext_time_ratio": round(
            statistics.median(tls_s) / statistics.median(tensor_s), 3
        ),
        "tls_target_mb_per_s": 150,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(asyncio.run(measure(args.repeats))))


if __name__ == "__main__":
    main()
