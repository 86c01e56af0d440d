"""The ``mpllama`` commands that work on checkpoint folders without Ray: init-checkpoint,
convert, reshard and check. CLI code: they print; errors are raised as MpllamaError and
shown as one line by ``cli.main``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import MpllamaError


def cmd_init_checkpoint(ns: argparse.Namespace) -> int:
    import torch

    from .checkpoint import find_shards
    from .offline.fixtures import init_checkpoint

    out = Path(ns.out)
    if ns.if_missing and (out / "params.json").is_file():
        shards = find_shards(out)
        print(f"{out} exists ({len(shards)} shard(s)); left as it is")
        return 0
    kwargs: dict[str, Any] = {}
    if ns.preset is not None:
        kwargs["preset"] = ns.preset
    if ns.mp is not None:
        kwargs["parts"] = ns.mp
    if ns.seed is not None:
        kwargs["seed"] = ns.seed
    if ns.dtype is not None:
        kwargs["dtype"] = getattr(torch, ns.dtype)
    if ns.vocab_size is not None:
        kwargs["vocab_size"] = ns.vocab_size
    init_checkpoint(out, **kwargs)
    print(f"wrote {out}: {len(find_shards(out))} shard(s), params.json, tokenizer.model")
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    from .offline import convert  # written alongside; imported only when asked for

    if ns.to == "meta":
        if ns.mp is None:
            raise MpllamaError("convert --to meta needs --mp N (how many shards to write)")
        out = convert.convert_hf_to_meta(ns.src, ns.out, ns.mp)
    else:
        if ns.mp is not None:
            raise MpllamaError(
                "--mp applies to --to meta only (a Hugging Face folder is not sharded by rank)"
            )
        out = convert.convert_meta_to_hf(ns.src, ns.out)
    print(f"wrote {out}")
    return 0


def cmd_reshard(ns: argparse.Namespace) -> int:
    from .checkpoint import (
        copy_tokenizer,
        detect_embedding_axis,
        find_shards,
        find_tokenizer,
        generation_axis,
        read_params,
        vocab_from_shards,
    )
    from .quantization import check_quantization, read_quantization
    from .rank.weights import load_rank_state, write_checkpoint
    from .tokenizer import load_tokenizer

    src, out = Path(ns.dir), Path(ns.out)
    if out.resolve() == src.resolve():
        raise MpllamaError(f"reshard would overwrite its input {src}; give another OUT folder")
    if ns.mp < 1:
        raise MpllamaError(f"--mp {ns.mp}: a checkpoint needs at least one shard")
    shards = find_shards(src)
    args = vocab_from_shards(read_params(src), shards)  # LLaMA 1/2 say -1
    stored = read_quantization(src)  # a quantized checkpoint reshards as stored
    if stored is not None:
        check_quantization(args, stored, ns.mp)
    # Merges every shard into one full state dict: the whole model sits in memory at once
    # (the shards are memory-mapped, the merged tensors are not). Fine up to host RAM.
    full = load_rank_state(shards, args, 0, 1, stored=stored)
    try:
        tokenizer = find_tokenizer(src)
    except MpllamaError:
        tokenizer = None
    # The embedding keeps the source's split (Llama 3: by vocabulary); one shard shows
    # none, so the tokenizer says which generation it is.
    if len(shards) > 1:
        axis = detect_embedding_axis(shards, args)
    else:
        axis = generation_axis(args, load_tokenizer(tokenizer).kind if tokenizer else None)
    write_checkpoint(out, args, full, ns.mp, embed_axis=axis, quant=stored)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out)
    print(
        f"wrote {out}: {len(shards)} shard(s) -> {ns.mp}"
        + ("" if tokenizer else " (no tokenizer.model found to copy)")
    )
    return 0


def cmd_quantize(ns: argparse.Namespace) -> int:
    """Quantize each shard as stored, one at a time (one shard's quantized tensors and one
    full-precision weight in memory at once); params.json says how."""
    import json

    import torch

    from .checkpoint import (
        copy_tokenizer,
        detect_embedding_axis,
        find_shards,
        find_tokenizer,
        read_params,
    )
    from .config import RuntimeConfig
    from .errors import ConfigError
    from .quantization import (
        QUANTIZATION_KEY,
        Quantization,
        check_quantization,
        int4_group_size,
        read_quantization,
    )
    from .rank.quantize import for_checkpoint, quantize_state
    from .rank.weights import load_shard

    src, out = Path(ns.src), Path(ns.out)
    if out.resolve() == src.resolve():
        raise MpllamaError(f"quantize would overwrite its input {src}; give another OUT folder")
    shards = find_shards(src)
    args = read_params(src)
    stored = read_quantization(src)
    if stored is not None:
        raise MpllamaError(
            f"{src} is already quantized ({stored.method}); quantize its full-precision "
            "checkpoint instead"
        )
    if ns.group_size is not None and ns.to != "int4":
        raise MpllamaError("--group-size applies to --to int4 only (int8 scales each row)")
    requested = RuntimeConfig.quant_group_size if ns.group_size is None else ns.group_size
    group_size = int4_group_size(args, requested, len(shards))
    try:
        quant = Quantization(ns.to, group_size, row_groups=len(shards)).split_as(
            len(shards), detect_embedding_axis(shards, args)
        )
        check_quantization(args, quant, len(shards))
    except ConfigError as exc:
        raise MpllamaError(f"cannot quantize {src}: {exc}") from None
    quant = for_checkpoint(quant, load_shard(shards[0]))  # a tied embedding stays int8
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("consolidated.*.pth"):
        stale.unlink()
    for path in shards:
        torch.save(quantize_state(load_shard(path), quant), out / path.name)
    params = json.loads((src / "params.json").read_text())
    params[QUANTIZATION_KEY] = quant.to_params()
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    try:
        copy_tokenizer(find_tokenizer(src), out)
    except MpllamaError:
        pass  # none beside it: the user passes one when running
    print(
        f"wrote {out}: {len(shards)} shard(s), linear weights {ns.to}, "
        f"embedding {quant.embedding}, output layer int8"
    )
    return 0


def cmd_check(ns: argparse.Namespace) -> int:
    from .checkpoint import (
        check_shards,
        detect_embedding_axis,
        find_shards,
        find_tokenizer,
        read_params,
        resolve_vocab,
    )
    from .hf_config import generation
    from .quantization import check_quantization, read_quantization
    from .shard_axes import check_model_parallel, shard_plan, shard_shapes
    from .tokenizer import load_tokenizer

    folder = Path(ns.dir)
    shards = find_shards(folder)
    args = read_params(folder)
    tok_path = find_tokenizer(folder, ns.tokenizer)
    tokenizer = load_tokenizer(tok_path)
    args = resolve_vocab(args, tokenizer.n_words, str(folder / "params.json"))
    check_model_parallel(args, len(shards))
    n_params = check_shards(shards, args)  # the files' indexes: cheap even for big shards
    n_weights = len(shard_shapes(args, len(shards)))
    # How the shards split the embedding: Llama 3 by vocabulary, Llama 1/2 by dimension.
    split = "vocabulary" if detect_embedding_axis(shards, args) == 0 else "model dimension"
    print(f"{folder}: ok")
    print(
        f"  shards:    {len(shards)} ({', '.join(p.name for p in shards[:4])}"
        f"{', ...' if len(shards) > 4 else ''})"
        + (f", embedding split by {split}" if len(shards) > 1 else "")
    )
    print(
        f"  model:     dim={args.dim} n_layers={args.n_layers} n_heads={args.n_heads} "
        f"n_kv_heads={args.kv_heads} ffn={args.ffn_dim} rope_theta={args.rope_theta:g}"
    )
    factor = args.rope_scaling_factor
    print(
        f"  release:   {generation(args, tokenizer.kind)} (RoPE scaling: "
        f"{'none' if factor is None else f'factor {factor:g}'})"
    )
    print(f"  weights:   {n_weights} tensors per shard, {n_params / 1e6:.2f}M values stored")
    print(f"  tokenizer: {tok_path} ({tokenizer.kind}, {tokenizer.n_words} pieces = vocab_size)")
    quant = read_quantization(folder)
    if quant is not None:
        how = f"groups of {quant.group_size}" if quant.method == "int4" else "scale per row"
        vocab = (
            f"; embedding {quant.embedding}, output layer int8"
            if quant.vocab
            else "; embedding and output layer as stored"
        )
        print(f"  quantized: {quant.method} linear weights ({how}{vocab}; mpllama quantize)")
    if ns.mp is not None:
        check_model_parallel(args, ns.mp)
        shard_plan(len(shards), ns.mp)
        if quant is not None:  # its groups must fit each rank's part, as a rank checks
            check_quantization(args, quant, ns.mp)
        print(f"  --mp {ns.mp}: ok ({len(shards)} shard(s) -> {ns.mp} rank(s))")
    return 0
