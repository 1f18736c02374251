"""What an info file says, as the table ``lowrank inspect`` prints and the runner logs: per replaced
layer the method, the ranks, parameters and multiply-adds before and after (and the measured times,
for the latency rule), the totals and the layers left alone; for AMCT's and msModelSlim's files, their
own records."""

from .info import DecomposeInfoError, is_msmodelslim_config, read_document
from .methods import conv_spec, specs_cost


def _ratio(before, after):
    return f"{before / after:.2f}x" if after else "-"


def _latency_cells(record) -> tuple[str, str, str]:
    """Dense and decomposed milliseconds and their ratio, as the latency rule measured them."""
    dense, decomposed = record.get("dense_seconds"), record.get("decomposed_seconds")
    if dense is None or decomposed is None:
        return "-", "-", "-"
    return f"{1e3 * dense:.3f}", f"{1e3 * decomposed:.3f}", f"{decomposed / dense:.2f}" if dense else "-"


def _amct_layer(record) -> dict:
    """An AMCT info file's record as the lowrank record the table reads: the spatial method, its rank
    and its costs, from the original layer and the two weight shapes."""
    info, nodes = record["ori_layer_info"], record["decom_nodes"]
    first, last = nodes["first"]["weight_shape"], nodes["last"]["weight_shape"]
    (sh, sw), (kh, kw) = info["stride"], info["kernel_size"]
    vertical_first = first[3] == 1  # (r, Cin, kh, 1): AMCT's kernels are 3 or more on each side
    strides = [(sh, 1), (1, sw)] if vertical_first else [(1, sw), (sh, 1)]
    after = specs_cost([conv_spec(s[1], s[0], s[2:], stride=t) for s, t in zip((first, last), strides)])
    dense = info["out_channels"] * info["in_channels"] // info["groups"] * kh * kw
    return {
        "name": info["name"],
        "method": "spatial",
        "ranks": [first[0]],
        "params": [dense, after.params],
        "macs_per_position": [dense, after.macs],
    }


def _msmodelslim_table(document) -> str:
    """msModelSlim's config file: its layers and hidden channels (it records no shapes, so no costs)."""
    rows = [("layer", "hidden channels")] + [
        (name, " x ".join(map(str, value)) if isinstance(value, list) else str(value))
        for name, value in document.items()
    ]
    width = max(len(row[0]) for row in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines.insert(1, "-" * len(max(lines, key=len)))
    lines.append(
        f"msModelSlim config file: {len(document)} layer(s); costs need the model (hidden_out x hidden_in for convs)"
    )
    return "\n".join(lines)


def inspect_table(path) -> str:
    """A table of the layers recorded in an info file (lowrank's or AMCT's), with totals and the skipped
    layers; with the latency rule, also the times it measured. For msModelSlim's config file, its layers
    and hidden channels."""
    document = read_document(path)
    if is_msmodelslim_config(document):
        return _msmodelslim_table(document)
    if isinstance(document, list):
        try:
            document = {"layers": [_amct_layer(record) for record in document]}
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise DecomposeInfoError(f"{path}: an AMCT record is incomplete or malformed: {error!r}") from None
    for index, layer in enumerate(document["layers"]):
        if not isinstance(layer, dict):
            raise DecomposeInfoError(f"{path}: layers[{index}] must be an object, got {layer!r}")
    timed = any("latency" in layer for layer in document["layers"])
    header = ("layer", "method", "ranks", "params", "decomposed", "ratio", "MACs/pos", "decomposed", "ratio")
    if timed:
        header += ("dense ms", "decomposed ms", "time ratio")
    rows, totals = [], [0, 0, 0, 0]
    for index, layer in enumerate(document["layers"]):
        try:
            (p0, p1), (m0, m1) = layer["params"], layer["macs_per_position"]
            if not all(isinstance(text, str) for text in (layer["name"], layer["method"])):
                raise TypeError("name and method must be strings")
            ranks = "x".join(str(rank) for rank in layer["ranks"])
            row = (layer["name"] or "(the model)", layer["method"], ranks, f"{p0:,}", f"{p1:,}", _ratio(p0, p1))
            row += (f"{m0:,}", f"{m1:,}", _ratio(m0, m1))
            rows.append(row + (_latency_cells(layer["latency"]) if "latency" in layer else ("-",) * 3) * timed)
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as error:
            name = layer.get("name")
            where = f"layer {name!r}" if isinstance(name, str) else f"layers[{index}]"
            raise DecomposeInfoError(f"{path}: the record of {where} is incomplete or malformed: {error!r}") from None
        totals = [t + v for t, v in zip(totals, (p0, p1, m0, m1))]
    p0, p1, m0, m1 = totals
    count = len(document["layers"])
    total = (f"total ({count} layer{'s' * (count != 1)})", "", "", f"{p0:,}", f"{p1:,}", _ratio(p0, p1))
    rows.append(total + (f"{m0:,}", f"{m1:,}", _ratio(m0, m1)) + ("",) * 3 * timed)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) if i < 3 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    policy = document.get("policy")
    measured_on = policy.get("measured_on") if isinstance(policy, dict) else None
    if isinstance(measured_on, dict):
        lines.append(
            f"times measured on {measured_on.get('device')} with {measured_on.get('torch_threads')} threads, "
            f"inputs {measured_on.get('example_input_shapes')}, torch {measured_on.get('torch')}"
        )
    skipped = document.get("skipped")
    for record in skipped if isinstance(skipped, list) else []:
        is_record = isinstance(record, dict)
        lines.append(f"skipped {record.get('name')!r}: {record.get('reason')}" if is_record else f"skipped {record!r}")
    return "\n".join(lines)
