"""prunefusion-client: talk to a prunefusion server from the shell.

    prunefusion-client generate "def fibonacci(n):" --stream
    prunefusion-client generate "The os module" --model tiny-lm --seed 7 --temperature 0.8
    prunefusion-client generate "The os module" --logprobs 3 --presence-penalty 0.5 --n 2
    prunefusion-client chat "What does the os module do?" --system "Answer briefly."
    prunefusion-client models
    prunefusion-client image "a red circle on the left" -o out.png --seed 3
    prunefusion-client caption out.png
    prunefusion-client embed "a first sentence" "a second one" --model minilm   # one JSON vector a line
    prunefusion-client --tls-ca ca.pem --api-key "$KEY" models      # a server with TLS and API keys
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from prunefusion_client import connection
from prunefusion_client.client import DEFAULT_TARGET, Client, GenerateOptions, ImageOptions


def _options(args: argparse.Namespace) -> GenerateOptions:
    messages = [("system", args.system)] if getattr(args, "system", None) else []
    if args.command == "chat":
        messages.append(("user", args.prompt))
    return GenerateOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or [], cache_policy=args.cache, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        min_new_tokens=args.min_new_tokens, ignore_eos=args.ignore_eos, logprobs=args.logprobs, n=args.n,
        messages=messages)


def _print_logprobs(logprobs) -> None:
    for lp in logprobs:
        alternatives = "  ".join(f"{t.token!r} {t.logprob:.3f}" for t in lp.top)
        print(f"{lp.token!r}\t{lp.logprob:.4f}\t{alternatives}", file=sys.stderr)


def _generate(client: Client, args: argparse.Namespace) -> None:
    options = _options(args)
    prompt = "" if args.command == "chat" else args.prompt
    if args.stream:
        last = None
        for chunk in client.generate_stream(prompt, args.model, options):
            if args.json:
                print(json.dumps(MessageToDict(chunk)), flush=True)
            else:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            last = chunk
        if last is not None and not args.json:
            print()
            print(f"[{_summary(last)}]", file=sys.stderr)
        return
    response = client.generate(prompt, args.model, options)
    if args.json:
        print(json.dumps(MessageToDict(response), indent=2))
        return
    for sample in response.samples or [response]:
        print(sample.text)
        _print_logprobs(sample.logprobs)
    print(f"[{_summary(response)}]", file=sys.stderr)


def _summary(message) -> str:
    from prunefusion_client.v1 import text_generation_pb2 as pb

    reason = pb.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
    t = message.timings
    return (f"finish={reason} prompt_tokens={message.usage.prompt_tokens} "
            f"completion_tokens={message.usage.completion_tokens} ttft={t.time_to_first_token_seconds * 1000:.1f}ms "
            f"total={t.total_seconds * 1000:.1f}ms cached={str(message.cached).lower()}"
            + (f" ({pb.CacheSource.Name(message.cache_source).removeprefix('CACHE_SOURCE_').lower()})"
               if message.cached else ""))


def _models(client: Client, args: argparse.Namespace) -> None:
    """Text models (TextGeneration), then image models (Multimodal)."""
    text, images = client.list_models(), client.list_image_models()
    if args.json:
        print(json.dumps([{"service": "TextGeneration", **MessageToDict(m)} for m in text]
                         + [{"service": "Multimodal", **MessageToDict(m)} for m in images], indent=2))
        return
    print(f"{'name':<20} {'family':<11} {'layers':>6} {'params':>12} {'engine':<7} {'context':>7}  digest")
    for m in text:
        print(f"{m.name:<20} {m.family:<11} {m.num_layers:>6} {m.num_parameters:>12,} {m.engine:<7} "
              f"{m.context_length:>7}  {m.weights_digest[:12]}")
    for m in images:
        print(f"{m.name:<20} {'image':<11} {'':>6} {m.num_parameters:>12,} {'images':<7} {'':>7}  "
              f"{m.weights_digest[:12]}  ({m.image_size}px up to {m.max_size}px, {m.default_steps} of at most "
              f"{m.max_steps} steps)")


def _image(client: Client, args: argparse.Namespace) -> None:
    options = ImageOptions(steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, size=args.size)
    response = client.generate_image(args.prompt, args.model, options)
    with open(args.output, "wb") as f:
        f.write(response.png)
    if args.json:
        print(json.dumps({k: v for k, v in MessageToDict(response).items() if k != "png"}, indent=2))
    else:
        t = response.timings
        print(f"wrote {args.output} ({response.width}x{response.height}) model={response.model} steps={response.steps} "
              f"guidance={response.guidance_scale:g} seed={response.seed} batch={t.batch_size} "
              f"total={t.total_seconds * 1000:.0f}ms", file=sys.stderr)


def _caption(client: Client, args: argparse.Namespace) -> None:
    with open(args.image, "rb") as f:
        response = client.caption(f.read(), args.model, max_tokens=args.max_tokens)
    print(json.dumps(MessageToDict(response), indent=2) if args.json else response.text)


def _embed(client: Client, args: argparse.Namespace) -> None:
    response = client.embed(args.texts, args.model)
    if args.json:
        print(json.dumps(MessageToDict(response), indent=2))
        return
    for embedding in response.embeddings:
        print(json.dumps([round(v, 7) for v in embedding.values]))
    t = response.timings
    print(f"[model={response.model} dimensions={response.dimensions} prompt_tokens={response.prompt_tokens} "
          f"batch={t.batch_size} total={t.total_seconds * 1000:.1f}ms]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunefusion-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server address (default %(default)s); several "
                        "replicas: IP:PORT,IP:PORT or dns:///NAME:PORT (balanced round-robin, retried on UNAVAILABLE)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline per call in seconds")
    parser.add_argument("--json", action="store_true", help="print protobuf messages as JSON")
    connection.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "generate a completion"),
                            ("chat", "the model's reply to a user message (its chat template, on the server)")):
        gen = sub.add_parser(name, help=help_text)
        gen.add_argument("prompt", help="the prompt" if name == "generate" else "the user's message")
        if name == "chat":
            gen.add_argument("--system", help="a system message before it")
        gen.add_argument("--model", default="", help="model name (default: the server's first model)")
        gen.add_argument("--stream", action="store_true", help="print text as it is generated")
        gen.add_argument("--max-new-tokens", type=int)
        gen.add_argument("--temperature", type=float, help="0 = greedy (the server default)")
        gen.add_argument("--top-p", type=float)
        gen.add_argument("--top-k", type=int)
        gen.add_argument("--seed", type=int)
        gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
        gen.add_argument("--presence-penalty", type=float, help="OpenAI's, in [-2, 2]")
        gen.add_argument("--frequency-penalty", type=float, help="OpenAI's, in [-2, 2]")
        gen.add_argument("--repetition-penalty", type=float, help="vLLM's and transformers', 1 = off")
        gen.add_argument("--min-new-tokens", type=int, help="no EOS or stop sequence before this many tokens")
        gen.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence tokens")
        gen.add_argument("--logprobs", type=int, metavar="N",
                         help="print each token's logprob and its N most likely alternatives (to stderr)")
        gen.add_argument("--n", type=int, help="independent samples (a seed gives sample i the seed + i)")
        gen.add_argument("--cache", default="default", choices=["default", "bypass", "refresh"],
                         help="response-cache policy (only deterministic requests are cached)")
        gen.set_defaults(func=_generate)
    image = sub.add_parser("image", help="generate an image with a Transfusion model")
    image.add_argument("prompt")
    image.add_argument("-o", "--output", default="out.png", help="PNG file to write (default %(default)s)")
    image.add_argument("--model", default="", help="model name (default: the server's first Transfusion model)")
    image.add_argument("--steps", type=int)
    image.add_argument("--guidance-scale", type=float)
    image.add_argument("--seed", type=int)
    image.add_argument("--size", type=int, help="output size: a multiple of the model's native size")
    image.set_defaults(func=_image)
    caption = sub.add_parser("caption", help="caption an image (PNG or JPEG) with a Transfusion model")
    caption.add_argument("image")
    caption.add_argument("--model", default="")
    caption.add_argument("--max-tokens", type=int)
    caption.set_defaults(func=_caption)
    embed = sub.add_parser("embed", help="sentence embeddings of TEXTs (one JSON vector a line, in order)")
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    embed.add_argument("--model", default="", help="model name (default: the server's first embedding model)")
    embed.set_defaults(func=_embed)
    models = sub.add_parser("models", help="list the served models: text (TextGeneration) and image (Multimodal)")
    models.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.target, timeout=args.timeout, connection=connection.from_args(args)) as client:
            args.func(client, args)
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:  # an unreadable image or output file; a value the API cannot carry
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
