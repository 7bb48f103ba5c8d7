"""A protocol file and what the driver (protocol.py) makes of it: the file's schema and checks,
the stages (each a command, its inputs and outputs), and the state on disk that says which are done.

A stage's key is a hash of its command template and of its inputs' keys, so a stage is done when
its record names the command the protocol now gives; outputs are written whole (write_atomic)."""
import ast
import contextlib
import glob
import hashlib
import io
import json
import os
import platform
import shutil
import statistics


HERE = os.path.dirname(os.path.abspath(__file__))

# ------------------------------------------------------------------------------ the protocol file
# Every key a protocol file may set, with its type and what it means. Anything else is refused.
SCHEMA = {
    "description": (str, "one paragraph: what the protocol measures and what to expect"),
    "data": (str, "'toy' (data.py toy, made here) or a folder holding train/ and test/ image folders"),
    "data_hint": (str, "how to get the data, shown when the folder is missing"),
    "autoencoder": (str, "'toy' (data.py toy's), 'train_vae' (train_vae.py's recipe, a stage), or a "
                    "save_pretrained folder / Hub id"),
    "autoencoder_args": (list, "train_vae.py's arguments beyond --data, --test-data and --out"),
    "reference": (dict, "FID reference statistics: dict(n=N) training images drawn at random"),
    "studies": (dict, "name -> dict(base=[train.py args], post=[train.py args of every arm], "
                "arms={arm: [train.py args]}, seeds=[training seeds], baseline=arm, score_base=bool, "
                "inflation=bool: metrics.py inflation of every checkpoint, denoise=dict(n=, levels=[σ/α], "
                "fid=[arms]): metrics.py denoise of every checkpoint, variants={name: dict(arms=[arms], and any of "
                "steps=, cfg=, seed=)}: each arm's runs scored again under other sampler settings, "
                "hybrids={name: dict(high=arm, low=arm, switch=σ/α)}: each seed's two runs sampled together "
                "(sample.py --ckpt-low))"),
    "score": (dict, "dict(n=samples, steps=sampler steps, cfg=guidance, seed=sampling seed, "
              "spectrum_n=images of the samples and of the training set for the spectrum error, <= n)"),
    "figures": (bool, "the spectrum and same-noise difference figures of seed 0's arms"),
    "bench": (list, "bench.py's arguments: a first stage that times the loss (empty: none)"),
    "threads": (int, "CPU threads per job (default: cores / --jobs)"),
    "timings": (dict, "measured seconds to project wall time before this machine has measured its "
                "own: vae_step, ref_image, score_sample, and 'train:MODEL:LOSS' per step"),
}
STUDY_KEYS = {"base": list, "post": list, "arms": dict, "seeds": list, "baseline": str, "score_base": bool,
              "inflation": bool, "denoise": dict, "variants": dict, "hybrids": dict}
DENOISE_KEYS = {"n": int, "levels": list, "fid": list}
VARIANT_KEYS = {"steps": int, "cfg": float, "seed": int}  # a variant's sampler settings, over score's
SCORE_KEYS = {"n": int, "steps": int, "cfg": float, "seed": int, "spectrum_n": int}
# train.py flags the driver sets itself: a protocol giving them would fight the driver.
DRIVER_FLAGS = ("--data", "--vae", "--run-dir", "--init-from", "--resume", "--seed", "--device")


class ProtocolError(Exception):
    pass


def load_protocol(path):
    """The protocol file's settings, checked against SCHEMA and against the scripts' own parsers:
    one ProtocolError naming the key for anything wrong, before any work."""
    if not os.path.isfile(path):
        raise ProtocolError(f"{path!r} is not a file: give a protocol file, e.g. protocols/smoke.py")
    scope, text = {}, open(path).read()
    try:
        tree = ast.parse(text, path)
    except SyntaxError as e:
        raise ProtocolError(f"{path}, line {e.lineno} is not Python: {e.msg}")
    for node in ast.walk(tree):  # a dict literal keeps the last of two equal keys without a word
        if isinstance(node, ast.Dict):
            seen = set()
            for k in node.keys:
                if isinstance(k, ast.Constant):
                    if k.value in seen:
                        raise ProtocolError(f"{path}, line {k.lineno}: {k.value!r} is named twice in one dict")
                    seen.add(k.value)
    try:
        exec(compile(tree, path, "exec"), scope)
    except Exception as e:
        line = getattr(e, "lineno", None)
        raise ProtocolError(f"{path}{f', line {line}' if line else ''} does not run as Python: "
                            f"{type(e).__name__}: {e}".replace("\n", " "))
    cfg = {k: v for k, v in scope.items() if not k.startswith("_") and k != "__builtins__"
           and not isinstance(v, type(os))}
    for k, v in cfg.items():
        if k not in SCHEMA:
            raise ProtocolError(f"{path}: unknown key {k!r}; a protocol sets {', '.join(SCHEMA)}")
        want = SCHEMA[k][0]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ProtocolError(f"{path}: {k} must be a {want.__name__}, got {type(v).__name__} {v!r}")
    for k in ("data", "autoencoder", "studies", "score"):
        if k not in cfg:
            raise ProtocolError(f"{path}: {k!r} is missing ({SCHEMA[k][1]})")
    cfg.setdefault("autoencoder_args", [])
    cfg.setdefault("reference", {"n": 5000})
    cfg.setdefault("figures", False)
    cfg.setdefault("bench", [])
    cfg.setdefault("timings", {})
    cfg.setdefault("description", "")
    cfg["name"] = os.path.splitext(os.path.basename(path))[0]
    if cfg["autoencoder"] == "train_vae":
        import train_vae
        check_script_args(f"{path}: autoencoder_args", "train_vae.py", train_vae.get_args, cfg["autoencoder_args"],
                          ["--data", HERE, "--test-data", HERE, "--out", HERE])  # (stand-ins: the driver's own)
    elif cfg["autoencoder_args"]:
        raise ProtocolError(f"{path}: autoencoder_args are train_vae.py's, but autoencoder is {cfg['autoencoder']!r}")
    if cfg["bench"]:
        import bench
        check_script_args(f"{path}: bench", "bench.py", bench.get_args, cfg["bench"])
    if cfg["autoencoder"] == "toy" and cfg["data"] != "toy":
        raise ProtocolError(f"{path}: autoencoder 'toy' comes with data 'toy' (data.py toy makes both)")
    if set(cfg["reference"]) != {"n"} or not isinstance(cfg["reference"]["n"], int) or cfg["reference"]["n"] < 2:
        raise ProtocolError(f"{path}: reference must be dict(n=N) with N >= 2 training images, got {cfg['reference']!r}")
    for k, t in SCORE_KEYS.items():
        v = cfg["score"].get(k)
        if not isinstance(v, (int, float) if t is float else t) or isinstance(v, bool):
            raise ProtocolError(f"{path}: score[{k!r}] must be a {t.__name__}, got {v!r}")
    if set(cfg["score"]) - set(SCORE_KEYS):
        raise ProtocolError(f"{path}: unknown score key(s) {sorted(set(cfg['score']) - set(SCORE_KEYS))}; "
                            f"score sets {', '.join(SCORE_KEYS)}")
    if cfg["score"]["n"] < 2 or cfg["score"]["steps"] < 1 or cfg["score"]["spectrum_n"] < 1:
        raise ProtocolError(f"{path}: score needs n >= 2, steps >= 1 and spectrum_n >= 1, got {cfg['score']!r}")
    if cfg["score"]["spectrum_n"] > cfg["score"]["n"]:  # metrics.py spectrum draws N of each folder
        raise ProtocolError(f"{path}: score's spectrum_n ({cfg['score']['spectrum_n']}) images are drawn from the "
                            f"samples too, of which there are n = {cfg['score']['n']}: make spectrum_n <= n")
    if "threads" in cfg and cfg["threads"] < 1:
        raise ProtocolError(f"{path}: threads must be >= 1, got {cfg['threads']}")
    if not cfg["studies"]:
        raise ProtocolError(f"{path}: studies is empty: name at least one base run")
    for name, st in cfg["studies"].items():
        where = f"{path}: studies[{name!r}]"
        if not isinstance(st, dict):
            raise ProtocolError(f"{where} must be a dict, got {type(st).__name__}")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ProtocolError(f"{where}: a study's name is a folder name: letters, digits, - and _")
        unknown = set(st) - set(STUDY_KEYS)
        if unknown:
            raise ProtocolError(f"{where}: unknown key(s) {sorted(unknown)}; a study sets {', '.join(STUDY_KEYS)}")
        for k, t in STUDY_KEYS.items():
            if k in st and not isinstance(st[k], t):
                raise ProtocolError(f"{where}[{k!r}] must be a {t.__name__}, got {type(st[k]).__name__}")
        if "base" not in st:
            raise ProtocolError(f"{where}: 'base' is missing (train.py's arguments of the base run)")
        st.setdefault("post", []), st.setdefault("arms", {}), st.setdefault("seeds", [0])
        st.setdefault("score_base", not st["arms"])
        st.setdefault("inflation", False)
        st.setdefault("baseline", next(iter(st["arms"]), ""))
        check_train_args(f"{where}['base']", st["base"])
        check_train_args(f"{where}['post']", st["post"], post=True)
        for arm, extra in st["arms"].items():
            if not isinstance(arm, str) or not arm.replace("-", "").replace("_", "").isalnum() or arm == "base":
                raise ProtocolError(f"{where}: arm {arm!r} must be a folder name (letters, digits, - and _), not 'base'")
            if not isinstance(extra, list):
                raise ProtocolError(f"{where}['arms'][{arm!r}] must be a list of train.py arguments")
            check_train_args(f"{where}['arms'][{arm!r}]", st["post"] + extra, post=True)
        if len(set(st["seeds"])) != len(st["seeds"]) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                  and 0 <= s < 2 ** 31 for s in st["seeds"]):
            raise ProtocolError(f"{where}['seeds'] must be distinct integers in [0, 2^31), got {st['seeds']!r}")
        if st["arms"] and st["baseline"] not in st["arms"]:
            raise ProtocolError(f"{where}: baseline {st['baseline']!r} is none of the arms {list(st['arms'])}")
        check_analyses(where, st)
    return cfg


def _number(v, integer=False):
    return isinstance(v, int if integer else (int, float)) and not isinstance(v, bool) and (integer or v == v and abs(v) < 1e6)


def check_analyses(where, st):
    """A study's denoise, variants and hybrids: keys, types, values and the arms they name, before any work."""
    arms = list(st["arms"])

    def arms_of(key, names):
        if not isinstance(names, list) or not all(a in arms for a in names):
            raise ProtocolError(f"{where}[{key!r}]: {names!r} must be a list of the study's arms {arms}")
    if "denoise" in st:
        d = st["denoise"]
        if set(d) - set(DENOISE_KEYS) or "n" not in d or "levels" not in d:
            raise ProtocolError(f"{where}['denoise'] must be dict(n=images, levels=[σ/α, ...], fid=[arms]), got {d!r}")
        if not _number(d["n"], True) or d["n"] < 2:
            raise ProtocolError(f"{where}['denoise']['n'] must be an integer >= 2, got {d['n']!r}")
        if not d["levels"] or not all(_number(v) and v > 0 for v in d["levels"]) or len(set(d["levels"])) != len(d["levels"]):
            raise ProtocolError(f"{where}['denoise']['levels'] must be distinct numbers σ/α > 0, got {d['levels']!r}")
        d.setdefault("fid", [])
        arms_of("denoise']['fid", d["fid"])
    for name, v in st.get("variants", {}).items():
        w = f"{where}['variants'][{name!r}]"
        if not isinstance(name, str) or not name.replace("-", "").isalnum():
            raise ProtocolError(f"{w}: a variant's name is part of a file name: letters, digits and -")
        if not isinstance(v, dict) or "arms" not in v or set(v) - {"arms", *VARIANT_KEYS} or len(v) < 2:
            raise ProtocolError(f"{w} must be dict(arms=[arms], and one or more of {', '.join(VARIANT_KEYS)}), got {v!r}")
        arms_of(f"variants'][{name!r}]['arms", v["arms"])
        for k in set(v) - {"arms"}:
            ok = _number(v[k], VARIANT_KEYS[k] is int) and (v[k] >= 1 if k == "steps" else 0 <= v[k] < 2 ** 31
                                                             if k == "seed" else True)
            if not ok:
                raise ProtocolError(f"{w}[{k!r}] must be {'an integer >= 1' if k == 'steps' else 'an integer seed' if k == 'seed' else 'a number'}, got {v[k]!r}")
    for name, h in st.get("hybrids", {}).items():
        w = f"{where}['hybrids'][{name!r}]"
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum() or name in arms or name == "base":
            raise ProtocolError(f"{w}: a hybrid's name is a folder name apart from the arms' (letters, digits, - and _)")
        if not isinstance(h, dict) or set(h) != {"high", "low", "switch"} or h["high"] not in arms or h["low"] not in arms:
            raise ProtocolError(f"{w} must be dict(high=arm, low=arm, switch=σ/α) with arms of {arms}, got {h!r}")
        if not _number(h["switch"]) or not h["switch"] > 0:
            raise ProtocolError(f"{w}['switch'] must be a number σ/α > 0, got {h['switch']!r}")


def check_script_args(where, script, get_args, args, given=()):
    """The arguments through the script's own parser and checks (argparse's types and choices, then
    its range checks), which stop with one line: that line becomes a ProtocolError naming the key."""
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ProtocolError(f"{where} must be a list of strings (command-line arguments), got {args!r}")
    for a in args:
        if a.split("=")[0] in DRIVER_FLAGS:
            raise ProtocolError(f"{where}: {a.split('=')[0]} is set by the driver (data, autoencoder, run folder, "
                                f"seed, device); drop it")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            return get_args([*given, *args])
        except SystemExit as e:
            msg = (str(e.code) if not isinstance(e.code, int) else err.getvalue()).strip().splitlines()
            raise ProtocolError(f"{where}: {script} would refuse {' '.join(args)!r}: "
                                f"{msg[-1] if msg else 'exit ' + str(e.code)}")


def check_train_args(where, args, post=False):
    """train.py's arguments of a base run (or, post=True, a post-training from the driver's base)."""
    import train
    check_script_args(where, "train.py", train.get_args, args, ["--init-from", __file__] if post else [])


# ------------------------------------------------------------------------------ stages
class Stage:
    """One unit of work: commands (lists of arguments with {data}, {work}, {results} and {vae}
    placeholders), the stages it needs, what it leaves for the stages after it (an artifact under
    runs/) and what it keeps (small files under results/)."""

    def __init__(self, name, kind, cmds, deps=(), artifact=None, keeps=(), units=1, rate=None, capture=None,
                 train_dir=None, steps=None, scratch=None, outputs=None, resume=None):
        self.name, self.kind, self.cmds, self.deps = name, kind, cmds, list(deps)
        self.artifact = artifact  # a path template under {work}: what later stages read
        self.keeps = keeps  # (source template, destination under {results}) copied when it finishes
        self.units, self.rate = units, rate  # work units (steps, images, samples) and the timing key
        self.capture = capture  # a results file the commands' stdout goes to (scores, tables)
        self.train_dir, self.steps = train_dir, steps  # a train.py run: resumable
        # Paths removed before the stage (re)starts: what a killed attempt left (samples, a file, kept features).
        self.scratch = (scratch,) if isinstance(scratch, str) else tuple(scratch or ())
        # A flag its first command continues its scratch with: an attempt under the same key is continued
        # (sample.py --resume, metrics.py stats --resume), anything else is removed as above.
        self.resume = resume
        # Files the commands write to {out} (figures) land in results/OUTPUTS/ once the stage succeeds:
        # a killed stage leaves no half-made figure in results, and a re-run never meets its own old one.
        self.outputs = outputs
        if outputs is not None:
            self.scratch = (f"{{work}}/out/{name}",)
            self.cmds = [[a.replace("{out}", self.scratch[0]) for a in cmd] for cmd in cmds]
        self.key = None


INFLATION_N = 512  # test images metrics.py inflation draws for each checkpoint


def data_needs(cfg):
    """{split: (images, what)}: how many images of the data folder's train/ and test/ the stages draw,
    so that a data folder too small for them is refused before any work."""
    needs = {"train": (max(cfg["reference"]["n"], cfg["score"]["spectrum_n"]),
                       "the FID reference's n and score's spectrum_n")}
    if any(st["inflation"] for st in cfg["studies"].values()):
        needs["test"] = (INFLATION_N, "metrics.py inflation of each checkpoint")
    n = max([st["denoise"]["n"] for st in cfg["studies"].values() if "denoise" in st], default=0)
    if n > needs.get("test", (0,))[0]:
        needs["test"] = (n, "metrics.py denoise of each checkpoint")
    return needs


def build_stages(cfg):
    """The protocol's stages, in the order they are run when nothing else is ready."""
    S, sc = [], cfg["score"]
    add = S.append
    toy = cfg["data"] == "toy"
    if toy:
        add(Stage("data", "data", [["data.py", "toy", "{work}/toy", "--per-class", "32"]], artifact="{work}/toy",
                  scratch="{work}/toy"))
    train_data = "{work}/toy/images" if toy else "{data}/train"
    test_data = "{work}/toy/images" if toy else "{data}/test"
    data_dep = ["data"] if toy else []
    if cfg["bench"]:
        add(Stage("bench", "bench", [["bench.py", *cfg["bench"]]], capture="bench.txt"))
    vae_dep = data_dep
    if cfg["autoencoder"] == "train_vae":
        steps = int(_flag(cfg["autoencoder_args"], "--steps", 3000))
        add(Stage("vae", "vae", [["train_vae.py", "--data", train_data, "--test-data", test_data, "--out",
                                  "{work}/vae", *cfg["autoencoder_args"]]], deps=data_dep, artifact="{work}/vae",
                  keeps=[("{work}/vae/metrics.json", "vae/metrics.json"),
                         ("{work}/vae/reconstructions.png", "vae/reconstructions.png")],
                  units=steps, rate="vae_step"))
        vae, vae_dep = "{work}/vae", data_dep + ["vae"]
    elif cfg["autoencoder"] == "toy":
        vae = "{work}/toy/vae"
    else:
        vae = cfg["autoencoder"]
    n_ref = cfg["reference"]["n"]
    add(Stage("reference", "ref", [["metrics.py", "stats", train_data, f"{{work}}/reference-{n_ref}.npz", "--n",
                                    str(n_ref)]], deps=data_dep, artifact=f"{{work}}/reference-{n_ref}.npz",
              units=n_ref, rate="ref_image", resume="--resume",  # scratch: the .npz, then its kept features (counted)
              scratch=(f"{{work}}/reference-{n_ref}.npz", f"{{work}}/reference-{n_ref}.features")))

    def score(name, run, deps, low=None, **over):
        """sample.py's FID and the spectrum error of a run (or, with low=(run, switch), of two runs
        sampled together), under score's settings or others (`over`: a variant's), into NAME/score.txt."""
        samples = f"{{work}}/samples/{name}"
        s = dict(sc, **over)
        mix = ["--ckpt-low", f"{{work}}/{low[0]}/ckpt.pt", "--switch", str(low[1])] if low else []
        return Stage(f"{name}/score", "score", [
            ["sample.py", "--ckpt", f"{{work}}/{run}/ckpt.pt", *mix, "--n", str(s["n"]), "--steps", str(s["steps"]),
             "--cfg", str(s["cfg"]), "--seed", str(s["seed"]), "--out-dir", samples, "--fid", "--fid-ref",
             f"{{work}}/reference-{n_ref}.npz"],
            ["metrics.py", "spectrum", samples, train_data, "--n", str(s["spectrum_n"])]],
            deps=deps + ["reference"], capture=f"{name}/score.txt",
            units=s["n"] * s["steps"] // sc["steps"], rate="score_sample", artifact=samples, scratch=samples,
            resume="--resume")

    def denoise(run, arm, st):
        """metrics.py denoise of one checkpoint: the same held-out images and noise for every run."""
        d = st["denoise"]
        fid = "--fid" if arm in d["fid"] else "--no-fid"
        return Stage(f"{run}/denoise", "denoise", [["metrics.py", "denoise", f"{{work}}/{run}/ckpt.pt", "--data", test_data,
                                                    "--n", str(d["n"]), "--levels", *map(str, d["levels"]), fid]],
                     deps=[run], capture=f"{run}/denoise.txt", units=0)

    def inflation(run):
        """σ(ϕ̂)/σ(ϕ) and ẑ0/z0 of one checkpoint on LPL's samples: the same images, t and noise for
        every run of the protocol (metrics.py inflation is seeded)."""
        return Stage(f"{run}/inflation", "inflation", [["metrics.py", "inflation", test_data, f"{{work}}/{run}/ckpt.pt",
                                                        "--n", str(INFLATION_N)]], deps=[run], capture=f"{run}/inflation.txt", units=0)

    def figures(study, st, seed):
        """Seed `seed`'s arms from the same noise (grids, and the first two arms' amplified difference)
        and the spectra of their scored samples against the training images."""
        arms = list(st["arms"])
        grids = [f"{{out}}/grid-{arm}-s{seed}.png" for arm in arms]
        cmds = [["sample.py", "--ckpt", f"{{work}}/{study}/{arm}-s{seed}/ckpt.pt", "--per-class", "6", "--label-rows",
                 "--steps", str(sc["steps"]), "--cfg", str(sc["cfg"]), "--seed", str(sc["seed"]), "--out", g]
                for arm, g in zip(arms, grids)]
        cmds.append(["metrics.py", "diff", grids[0], grids[min(1, len(grids) - 1)], "--zoom", "1",
                     "--out", "{out}/diff.png"])
        cmds.append(["metrics.py", "spectrum", *[f"{{work}}/samples/{study}/{arm}-s{seed}" for arm in arms],
                     train_data, "--n", str(sc["spectrum_n"]), "--plot", "{out}/spectrum.png"])
        return Stage(f"{study}/figures", "figures", cmds, deps=[f"{study}/{a}-s{seed}{x}" for a in arms for x in ("", "/score")],
                     capture=f"{study}/figures.txt", units=0, outputs=study)

    for study, st in cfg["studies"].items():
        base_args = ["--data", train_data, "--vae", vae, *st["base"]]
        steps = int(_flag(st["base"], "--steps", 50000))
        add(Stage(f"{study}/base", "train", [["train.py", *base_args, "--run-dir", f"{{work}}/{study}/base"]],
                  deps=vae_dep, artifact=f"{{work}}/{study}/base", train_dir=f"{{work}}/{study}/base", steps=steps,
                  keeps=[(f"{{work}}/{study}/base/log.jsonl", f"{study}/base/log.jsonl")], units=steps,
                  rate=train_rate(st["base"], st["base"])))
        if st["score_base"]:
            add(score(f"{study}/base", f"{study}/base", [f"{study}/base"]))
        if st["inflation"]:
            add(inflation(f"{study}/base"))
        # Arm by arm, each at every seed (the protocol file lists its arms in the order their answers are
        # wanted), each hybrid as soon as its two arms are there, and the variants after all arms.
        hybrids, done = dict(st.get("hybrids", {})), []
        for arm, extra in st["arms"].items():
            for seed in st["seeds"]:
                run = f"{study}/{arm}-s{seed}"
                args = ["--init-from", f"{{work}}/{study}/base/ckpt.pt", *st["post"], *extra, "--seed", str(seed)]
                steps = int(_flag(st["post"] + extra, "--steps", 50000))
                add(Stage(run, "train", [["train.py", *args, "--run-dir", f"{{work}}/{run}"]], deps=[f"{study}/base"],
                          artifact=f"{{work}}/{run}", train_dir=f"{{work}}/{run}", steps=steps,
                          keeps=[(f"{{work}}/{run}/log.jsonl", f"{run}/log.jsonl")], units=steps,
                          rate=train_rate(st["base"], st["post"] + extra)))
                add(score(run, run, [run]))
                if st["inflation"]:
                    add(inflation(run))
                if "denoise" in st:
                    add(denoise(run, arm, st))
            done.append(arm)
            for name, h in list(hybrids.items()):  # each seed's two runs sampled together
                if {h["high"], h["low"]} <= set(done):
                    for seed in st["seeds"]:
                        high, low = f"{study}/{h['high']}-s{seed}", f"{study}/{h['low']}-s{seed}"
                        add(score(f"{study}/{name}-s{seed}", high, [high, low], low=(low, h["switch"])))
                    del hybrids[name]
        for name, v in st.get("variants", {}).items():  # runs scored again under other sampler settings, once all
            for a in v["arms"]:                             # arms are trained (in the protocol file's order)
                for seed in st["seeds"]:
                    run = f"{study}/{a}-s{seed}"  # (scored into STUDY/VARIANT/ARM-sSEED/score.txt)
                    add(score(f"{study}/{name}/{a}-s{seed}", run, [run], **{k: v[k] for k in VARIANT_KEYS if k in v}))
        if cfg["figures"] and st["arms"]:  # seed 0's arms from the same noise
            add(figures(study, st, st["seeds"][0]))
        def folder(arm, seed):  # the stages that write into a run's results folder: a table reading it waits for all
            return [f"{study}/{arm}-s{seed}/{x}" for x in ("score", "inflation", "denoise")
                    if x == "score" or (st.get(x) and arm in st["arms"])]
        if st["arms"]:
            runs = [f"{{results}}/{study}/{arm}-s{seed}" for arm in st["arms"] for seed in st["seeds"]]
            add(Stage(f"{study}/table", "table", [["metrics.py", "table", *runs, "--baseline", st["baseline"],
                                                   "--plot", "{out}/seeds.png"]],
                      deps=[d for a in st["arms"] for s in st["seeds"] for d in folder(a, s)],
                      capture=f"{study}/table.md", units=0, outputs=study))
        if "denoise" in st:
            add(Stage(f"{study}/table-denoise", "table", [["metrics.py", "table", *runs, "--baseline", st["baseline"],
                                                           "--denoise", "--plot", "{out}/denoise.png"]],
                      deps=[d for a in st["arms"] for s in st["seeds"] for d in folder(a, s)],
                      capture=f"{study}/table-denoise.md", units=0, outputs=study))
        for name, h in st.get("hybrids", {}).items():
            arms = list(dict.fromkeys([st["baseline"], h["high"], h["low"]]))
            runs = [f"{{results}}/{study}/{a}-s{s}" for a in [*arms, name] for s in st["seeds"]]
            add(Stage(f"{study}/table-{name}", "table", [["metrics.py", "table", *runs, "--baseline", st["baseline"]]],
                      deps=[d for a in [*arms, name] for s in st["seeds"] for d in folder(a, s)],
                      capture=f"{study}/table-{name}.md", units=0))
        for name, v in st.get("variants", {}).items():
            base = ["--baseline", st["baseline"]] if st["baseline"] in v["arms"] else []
            if set(v) == {"arms", "seed"}:  # another sampling seed: the first sampling's table, and how far it moves
                runs = [f"{{results}}/{study}/{a}-s{s}" for a in v["arms"] for s in st["seeds"]]
                cmd = ["metrics.py", "table", *runs, *base, "--resampled", f"{{results}}/{study}/{name}"]
                deps = [d for a in v["arms"] for s in st["seeds"] for d in [*folder(a, s), f"{study}/{name}/{a}-s{s}/score"]]
            else:
                cmd = ["metrics.py", "table", *[f"{{results}}/{study}/{name}/{a}-s{s}" for a in v["arms"] for s in st["seeds"]],
                       *base]
                deps = [f"{study}/{name}/{a}-s{s}/score" for a in v["arms"] for s in st["seeds"]]
            add(Stage(f"{study}/table-{name}", "table", [cmd], deps=deps, capture=f"{study}/table-{name}.md", units=0))
    names = [s.name for s in S]
    assert len(names) == len(set(names)), names
    by_name = {s.name: s for s in S}
    for s in S:  # a stage's key: its own commands and the keys of what it reads
        s.key = hashlib.sha256(json.dumps([s.cmds, [by_name[d].key for d in s.deps]]).encode()).hexdigest()[:16]
    return S


def _flag(args, flag, default):
    """The value of the last `flag` in an argument list (train.py's --steps etc.), or default."""
    value = default
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def train_rate(base, args):
    """The timing key of a training run: its model and whether it decodes (LPL, RGB)."""
    return f"train:{_flag(base, '--model', 'DiT-S/2')}:{_flag(args, '--loss', 'l2')}"


# ------------------------------------------------------------------------------ state on disk
class Paths:
    def __init__(self, work, results, data):
        self.work, self.results, self.data = work, results, data
        self.stages = os.path.join(results, "stages")

    def fill(self, template):
        """A template's path, relative to the repository when it lies inside it (the commands run there)."""
        out = (template.replace("{work}", self.work).replace("{results}", self.results)
               .replace("{data}", self.data or ""))
        return os.path.relpath(out, HERE) if out.startswith(HERE + os.sep) else out

    def record(self, stage):
        return os.path.join(self.stages, stage.name.replace("/", "__") + ".json")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_atomic(path, text):
    """Write text to a temporary name beside path and rename it: a reader sees all of it or none."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_atomic(src, dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def artifact_hash(path):
    """A fingerprint of what a stage left for later stages: the weights, not file dates or paths.
    A checkpoint is fingerprinted by its EMA weights, an autoencoder folder by its weight files,
    anything else by its bytes."""
    if path is None or not os.path.exists(path):
        return None
    h = hashlib.sha256()
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "ckpt.pt")):
        import torch
        ema = torch.load(os.path.join(path, "ckpt.pt"), map_location="cpu", weights_only=False)["ema"]
        for k in sorted(ema):
            h.update(k.encode()), h.update(ema[k].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(f) and f.endswith((".safetensors", ".bin", ".json", ".npz", ".png"))
                   and not f.endswith("metrics.json")) if os.path.isdir(path) else [path]
    for f in files:
        h.update(os.path.relpath(f, path).encode() if os.path.isdir(path) else b"")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def train_progress(run_dir):
    """(step of the last checkpoint, median s/step of the log) of a train.py run folder."""
    step, rates = 0, []
    log = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(log):
        for line in open(log):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                rates.append(row["s_per_step"])
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        import torch
        step = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=False)["step"]
    return step, statistics.median(rates[1:] or rates) if rates else None


def vae_step(folder):
    """The step of train_vae.py's last training state in folder (0 if none)."""
    path = os.path.join(folder, "train-state.pt")
    if not os.path.exists(path):
        return 0
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)["step"]


def host():
    """What the timings were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = None
    with contextlib.suppress(Exception):
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return gpu or cpu
