#!/usr/bin/env bash
# Checks the container deployment without a container engine: Dockerfile, .dockerignore,
# docker-compose.yml, .env.example, deploy/compose/nginx.conf and deploy/docker/healthcheck.
# Nothing here builds an image or starts a container (docs/deploy.md says what that leaves
# unchecked).
#
#   ./scripts/check-deploy.sh
#
# 1. docker-compose.yml parses as YAML (duplicate keys are errors, as in Docker Compose), is valid
#    Compose: `docker-compose config` (Debian's docker-compose, installed when missing with
#    --no-install-recommends, so without a container engine; version 1.29 checks the file
#    against the Compose specification's JSON schema it ships, version 2 against its current
#    one) and `docker compose config` too where that plugin exists; and holds together: the five
#    services, every depends_on target exists and has the healthcheck its condition waits for,
#    the nodes' settings point at the redis and postgres services, secrets come from the
#    environment and are listed in .env.example, only the proxy publishes a port, ports and
#    durations are well formed.
# 2. deploy/compose/nginx.conf passes `nginx -t` (Debian's nginx, installed when missing), on a
#    copy whose node names are loopback addresses and whose listening port is a free loopback
#    one (nginx resolves upstream names and binds its ports even to test), and says what the
#    nodes need: their service names and port, WebSocket upgrades, Host and Origin unchanged,
#    long timeouts.
# 3. The Dockerfile parses (instructions, continuation lines, stages, JSON forms): COPY --from
#    names an earlier stage; the builder runs `cargo build --release --locked` for the examples
#    whose binaries the runtime stage copies, from the paths that build writes
#    (target/release/examples/NAME); builder and runtime are the same Debian release; the
#    builder's Rust is no older than the workspace's rust-version, nor than any locked
#    dependency the image builds asks for (cargo metadata); the runtime stage runs as non-root,
#    exposes the port CHAT_ADDR names, and its CMD and HEALTHCHECK name installed programs;
#    no TLS library is locked (the runtime image has no libssl or CA certificates);
#    .dockerignore leaves out target/, .git, .env, node_modules and chat.db but nothing the
#    build reads. hadolint runs too when it is installed (optional; it is not installed here).
# 4. deploy/docker/healthcheck, the image's probe, passes against a local HTTP server answering
#    200, and fails on 503 and on a closed port.
#
# Installing Debian's nginx package starts nginx on port 80 where the machine starts services on
# install (it does not here); the script itself runs nginx only as `nginx -t`.
#
# Any failure prints "check-deploy: FAILED: ..." and exits non-zero. A check this machine cannot
# run fails too, except the optional ones, which print "check-deploy: not checked: ..." on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "check-deploy: FAILED: $*" >&2
    exit 1
}
ok() { echo "check-deploy: ok: $*"; }
not_checked() { echo "check-deploy: not checked: $*" >&2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")
PROBE_SERVER_PID=
cleanup() {
    if [ -n "$PROBE_SERVER_PID" ]; then kill "$PROBE_SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Installs Debian packages (as the project's other scripts do), or fails saying what is missing.
install_debian() {
    local sudo=
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || fail "needs $* (Debian packages) and cannot install them: not root and no sudo"
        sudo=sudo
    fi
    command -v apt-get >/dev/null 2>&1 || fail "needs $* and cannot install them: no apt-get here"
    echo "check-deploy: installing Debian's $*" >&2
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Python 3 with PyYAML: the one on PATH, else Debian's, installing python3-yaml when neither has it.
PY=
for candidate in python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' 2>/dev/null; then
        PY=$candidate
        break
    fi
done
if [ -z "$PY" ]; then
    install_debian python3 python3-yaml
    PY=/usr/bin/python3
    "$PY" -c 'import yaml' || fail "python3-yaml installed but 'import yaml' still fails"
fi

for needed in Dockerfile .dockerignore docker-compose.yml .env.example deploy/compose/nginx.conf deploy/docker/healthcheck; do
    [ -f "$needed" ] || fail "$needed is missing"
done

# ---------------------------------------------------------------------------------------------
# The Python half: YAML, Dockerfile and nginx.conf structure. It prints "ok: ..." lines, "not
# checked: ..." lines, and on a problem "FAILED: ..." and exits 1. Its `facts` output (the
# nginx copy to test, the builder's Rust version) feeds the shell checks below.
# ---------------------------------------------------------------------------------------------
cat >"$WORK/check.py" <<'PYTHON'
import json, os, re, shlex, subprocess, sys
import yaml

WORK = sys.argv[1]
facts = {}

def fail(message):
    print(f"check-deploy: FAILED: {message}", file=sys.stderr)
    sys.exit(1)

def ok(message):
    print(f"check-deploy: ok: {message}")

def not_checked(message):
    print(f"check-deploy: not checked: {message}", file=sys.stderr)

def warning(message):
    """Not (yet) a failure: something the servers are still gaining, said on every run."""
    print(f"check-deploy: warning: {message}", file=sys.stderr)

def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()

def duration_seconds(text, what):
    """A Compose or nginx duration (10s, 1m30s, 1h, 500ms) in seconds."""
    text = str(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        fail(f"{what}: {text!r} is not a duration")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * scale[u] for n, u in parts)

# ---- 1. docker-compose.yml --------------------------------------------------------------------

class StrictLoader(yaml.SafeLoader):
    """Safe YAML with duplicate mapping keys as errors (Docker Compose rejects them too)."""

def construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)

StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)

try:
    compose = yaml.load(read("docker-compose.yml"), Loader=StrictLoader)
except yaml.YAMLError as error:
    fail(f"docker-compose.yml is not valid YAML: {error}")
if not isinstance(compose, dict) or not isinstance(compose.get("services"), dict):
    fail("docker-compose.yml has no `services` mapping")
ok("docker-compose.yml parses as YAML, no duplicate keys")

INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")

def interpolate(value):
    """Compose interpolation with defaults used and required variables given a placeholder."""
    def one(match):
        name, op, arg = match.groups()
        if op in (":-", "-"):
            return arg
        return "placeholder"
    return INTERPOLATION.sub(one, str(value))

def required_vars(value):
    return {m.group(1) for m in INTERPOLATION.finditer(str(value)) if m.group(2) in (":?", "?")}

services = compose["services"]
NODES = ["node1", "node2"]
for name in NODES + ["redis", "postgres", "proxy"]:
    if name not in services:
        fail(f"docker-compose.yml: no service {name!r} (expected node1, node2, redis, postgres, proxy)")
ok(f"services: {', '.join(sorted(services))}")

def env_of(service):
    env = services[service].get("environment") or {}
    if isinstance(env, list):
        env = dict((item.split("=", 1) + [None])[:2] for item in env)
    return env

def healthcheck_test(service):
    check = services[service].get("healthcheck")
    if not check or check.get("disable") or not check.get("test"):
        return None
    test = check["test"]
    if test == ["NONE"] or test == "NONE":
        return None
    for key in ("interval", "timeout", "start_period"):
        if key in check:
            duration_seconds(check[key], f"{service}.healthcheck.{key}")
    return test

for name, service in services.items():
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        depends = {d: {"condition": "service_started"} for d in depends}
    for target, spec in depends.items():
        if target not in services:
            fail(f"{name}.depends_on: no service {target!r}")
        if (spec or {}).get("condition") == "service_healthy" and not healthcheck_test(target):
            fail(f"{name} waits for {target} to be healthy, and {target} has no healthcheck")
    for volume in service.get("volumes") or []:
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source and not source.startswith((".", "/", "~")) and source not in (compose.get("volumes") or {}):
            fail(f"{name}: volume {source!r} is not declared under top-level `volumes`")
    if "stop_grace_period" in service:
        duration_seconds(service["stop_grace_period"], f"{name}.stop_grace_period")
ok("every depends_on target exists and has the healthcheck its condition waits for; named volumes declared")

for name in ("redis", "postgres") + tuple(NODES):
    if not healthcheck_test(name):
        fail(f"{name} has no healthcheck")
if "redis-cli" not in json.dumps(healthcheck_test("redis")) or "ping" not in json.dumps(healthcheck_test("redis")):
    fail("redis's healthcheck is not `redis-cli ping`")
if "pg_isready" not in json.dumps(healthcheck_test("postgres")):
    fail("postgres's healthcheck is not pg_isready")

# Ports: only the proxy publishes; each mapping well formed.
def parse_port(spec, where):
    spec = interpolate(spec)
    spec = spec.split("/")[0]
    parts = spec.rsplit(":", 2)
    for part in parts[-2:] if len(parts) > 1 else parts:
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            fail(f"{where}: port mapping {spec!r} has a bad port {part!r}")
    if len(parts) == 3 and not re.fullmatch(r"[0-9.]+|\[[0-9a-fA-F:]+\]", parts[0]):
        fail(f"{where}: port mapping {spec!r} has a bad host address {parts[0]!r}")
    return int(parts[-1])

for name, service in services.items():
    if service.get("ports") and name != "proxy":
        fail(f"{name} publishes ports; only the proxy should")
proxy_ports = [parse_port(p, "proxy.ports") for p in services["proxy"].get("ports") or []]
if len(proxy_ports) != 1:
    fail("the proxy should publish exactly one port")
ok(f"only the proxy publishes a port (container port {proxy_ports[0]}); port mappings well formed")

# Secrets come from the environment, never literals, and .env.example lists every required one.
postgres_env = env_of("postgres")
for name, env in [(n, env_of(n)) for n in NODES] + [("postgres", postgres_env)]:
    for key in ("CHAT_JWT_SECRET", "POSTGRES_PASSWORD"):
        if key in env and not required_vars(env[key]) >= {key}:
            fail(f"{name}: {key} is not taken from ${{{key}:?...}}")
required = set()
for name, service in services.items():
    required |= required_vars(json.dumps(service))
example_vars = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", read(".env.example"), re.M))
if not required <= example_vars:
    fail(f".env.example does not list {sorted(required - example_vars)}, which docker-compose.yml requires")
if os.path.exists(".gitignore") and not re.search(r"^/?\.env$", read(".gitignore"), re.M):
    fail(".gitignore does not list .env (it holds the secrets)")
ok(f"secrets only from the environment ({', '.join(sorted(required))}), all in .env.example; .env ignored by git")

# The nodes: what they run and how they reach Redis and PostgreSQL.
declared_env = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', read("examples/common/mod.rs")))
if not declared_env:
    fail("found no `env = \"CHAT_...\"` flags in examples/common/mod.rs to check the nodes' settings against")
server_sources = ""
for root in ("examples", "chat-ws-warp/src", "chat-ws-tungstenite/src"):
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".rs"):
                server_sources += read(os.path.join(dirpath, f))
node_ports, unknown_passed = set(), set()
for name in NODES:
    service, env = services[name], env_of(name)
    build = service.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    dockerfile = "Dockerfile" if isinstance(build, str) else (build or {}).get("dockerfile", "Dockerfile")
    if not context or not os.path.isfile(os.path.join(context, dockerfile)):
        fail(f"{name}: build context {context!r} has no {dockerfile}")
    expect = {"CHAT_LAYER": "redis", "CHAT_AUTH": "jwt"}
    for key, value in expect.items():
        if env.get(key) != value:
            fail(f"{name}: {key} should be {value!r}, is {env.get(key)!r}")
    redis_url = interpolate(env.get("CHAT_REDIS_URL", ""))
    if not re.fullmatch(r"redis://redis(:6379)?/?", redis_url):
        fail(f"{name}: CHAT_REDIS_URL {redis_url!r} is not redis://redis:6379")
    store = env.get("CHAT_STORE", "")
    m = re.fullmatch(r"postgres(?:ql)?://postgres:(\$\{[^}]+\})@postgres(?::5432)?/([A-Za-z0-9_]+)", store)
    if not m:
        fail(f"{name}: CHAT_STORE {store!r} is not postgres://postgres:${{POSTGRES_PASSWORD...}}@postgres:5432/DB")
    if required_vars(m.group(1)) != required_vars(postgres_env.get("POSTGRES_PASSWORD", "")):
        fail(f"{name}: CHAT_STORE's password is not the variable the postgres service uses")
    if m.group(2) != postgres_env.get("POSTGRES_DB", "postgres"):
        fail(f"{name}: CHAT_STORE names database {m.group(2)!r}, postgres creates {postgres_env.get('POSTGRES_DB')!r}")
    addr = interpolate(env.get("CHAT_ADDR", ""))
    am = re.fullmatch(r"(0\.0\.0\.0|\[::\]):(\d+)", addr)
    if not am:
        fail(f"{name}: CHAT_ADDR {addr!r} should listen on all interfaces (0.0.0.0:PORT)")
    node_ports.add(int(am.group(2)))
    for key, value in env.items():
        if not key.startswith("CHAT_") or key in declared_env:
            continue
        if value is None:
            unknown_passed.add(key)
        else:
            fail(f"{name}: {key} is set but no flag of the servers reads it (not in examples/common/mod.rs)")
    test = healthcheck_test(name)
    if not (isinstance(test, list) and test[:2] == ["CMD", "chat-healthcheck"] and test[2:] == ["/readyz"]):
        fail(f"{name}: healthcheck should be [CMD, chat-healthcheck, /readyz], is {test!r}")
    grace = duration_seconds(service.get("stop_grace_period", "10s"), f"{name}.stop_grace_period")
    if grace <= 10:
        fail(f"{name}: stop_grace_period {grace:g}s leaves no margin over the servers' 10 s shutdown")
    facts.setdefault("node_commands", set()).add(
        (service.get("command") or ["chat-server"])[0] if isinstance(service.get("command"), list)
        else shlex.split(service.get("command") or "chat-server")[0])
for key in sorted(unknown_passed):
    warning(f"the nodes get {key} when it is set, but no flag of the servers reads it yet "
         f"(examples/common/mod.rs declares no env = \"{key}\")")
if len(node_ports) != 1:
    fail(f"the nodes listen on different ports {sorted(node_ports)}")
NODE_PORT = node_ports.pop()
ok(f"nodes: redis layer at redis:6379, PostgreSQL store at postgres:5432, jwt auth, port {NODE_PORT}, "
   "healthcheck GET /readyz, stop_grace_period over 10 s")
for endpoint in ("/healthz", "/readyz"):
    if endpoint not in server_sources and endpoint.lstrip("/") not in server_sources:
        warning(f"no server source (examples/, chat-ws-*/src) mentions {endpoint} yet: the image's and "
             "the nodes' healthchecks ask for it, and fail until the servers answer it")

# ---- 2. deploy/compose/nginx.conf -------------------------------------------------------------

proxy = services["proxy"]
if "nginx" not in str(proxy.get("image", "")):
    fail("the proxy service does not run an nginx image")
mounts = [v for v in proxy.get("volumes") or [] if isinstance(v, str)]
if not any(re.fullmatch(r"\./deploy/compose/nginx\.conf:/etc/nginx/nginx\.conf(:ro)?", v) for v in mounts):
    fail("the proxy does not mount ./deploy/compose/nginx.conf as /etc/nginx/nginx.conf")
for node in NODES:
    if ((proxy.get("depends_on") or {}).get(node) or {}).get("condition") != "service_healthy":
        fail(f"the proxy does not wait for {node} to be healthy")

conf = read("deploy/compose/nginx.conf")
conf_code = re.sub(r"#[^\n]*", "", conf)
upstreams = re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", conf_code)
if len(upstreams) != 1:
    fail("deploy/compose/nginx.conf should have one upstream block")
upstream_name, upstream_body = upstreams[0]
servers = re.findall(r"^\s*server\s+([^\s;]+)", upstream_body, re.M)
expected = {f"{n}:{NODE_PORT}" for n in NODES}
if set(servers) != expected:
    fail(f"nginx upstream servers {servers} are not the node services {sorted(expected)}")
listens = re.findall(r"^\s*listen\s+([^\s;]+)", conf_code, re.M)
if [l.rsplit(":", 1)[-1] for l in listens] != [str(proxy_ports[0])]:
    fail(f"nginx listens on {listens}, the proxy service publishes container port {proxy_ports[0]}")
def has(directive):
    return re.search(r"^\s*" + directive.replace(" ", r"\s+").replace("$", r"\$") + r"\s*;", conf_code, re.M)
for directive in (f"proxy_pass http://{upstream_name}", "proxy_http_version 1.1",
                  "proxy_set_header Upgrade $http_upgrade", "proxy_set_header Connection $connection_upgrade",
                  "proxy_set_header Host $http_host", "proxy_set_header Origin $http_origin"):
    if not has(directive):
        fail(f"deploy/compose/nginx.conf lacks `{directive};`")
for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
    m = re.search(r"^\s*" + timeout + r"\s+(\S+)\s*;", conf_code, re.M)
    if not m or duration_seconds(m.group(1), timeout) < 300:
        fail(f"deploy/compose/nginx.conf: {timeout} should be long (minutes at least) for WebSockets")
ok(f"nginx.conf: upstream {', '.join(servers)}, listens on {proxy_ports[0]}, passes upgrades, "
   "Host ($http_host) and Origin unchanged, long timeouts")

# The copy `nginx -t` tests: node names as loopback addresses, a free loopback port, temporary
# paths inside the scratch directory.
test_conf = conf
for i, node in enumerate(NODES, start=1):
    test_conf = re.sub(r"(server\s+)" + node + r":", rf"\g<1>127.0.0.{i}:", test_conf)
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); free_port = s.getsockname()[1]; s.close()
test_conf = re.sub(r"(^\s*listen\s+)[^;]+;", rf"\g<1>127.0.0.1:{free_port};", test_conf, flags=re.M)
temp = os.path.join(WORK, "nginx-tmp")
test_conf = re.sub(r"^http\s*\{", "http {\n" + "".join(
    f"    {d}_temp_path {temp};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
    test_conf, count=1, flags=re.M)
with open(os.path.join(WORK, "nginx.conf"), "w") as f:
    f.write(test_conf)

# ---- 3. Dockerfile and .dockerignore ---------------------------------------------------------

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
                "MAINTAINER"}

def dockerfile_instructions(text):
    """(line number, INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    out, buffer, start = [], "", None
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped, as Docker does
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        word, _, rest = buffer.strip().partition(" ")
        if word.upper() not in INSTRUCTIONS:
            fail(f"Dockerfile:{start}: unknown instruction {word!r}")
        out.append((start, word.upper(), rest.strip()))
        buffer, start = "", None
    if buffer:
        fail("Dockerfile ends inside a continued instruction")
    return out

def flags_and_args(rest):
    words = shlex.split(rest)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags.setdefault(key, []).append(value)
    return flags, words

def exec_form(rest, where):
    if rest.startswith("["):
        try:
            value = json.loads(rest)
        except json.JSONDecodeError as error:
            fail(f"{where}: bad JSON form {rest!r}: {error}")
        if not value or not all(isinstance(v, str) for v in value):
            fail(f"{where}: the JSON form should be a list of strings")
        return value
    return shlex.split(rest)

stages = []
for number, instruction, rest in dockerfile_instructions(read("Dockerfile")):
    where = f"Dockerfile:{number} {instruction}"
    if instruction == "FROM":
        words = rest.split()
        if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
            fail(f"{where}: expected `FROM IMAGE [AS NAME]`")
        name = words[2] if len(words) == 3 else None
        if name and any(s["name"] == name for s in stages):
            fail(f"{where}: stage name {name!r} used twice")
        stages.append({"name": name, "image": words[0], "workdir": "/", "ins": [], "env": {}})
        continue
    if not stages:
        if instruction == "ARG":
            continue
        fail(f"{where}: before the first FROM")
    stages[-1]["ins"].append((number, instruction, rest))
    if instruction == "WORKDIR":
        stages[-1]["workdir"] = os.path.normpath(os.path.join(stages[-1]["workdir"], rest))
    if instruction == "ENV":
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
            stages[-1]["env"][key] = value.strip('"')
if len(stages) < 2:
    fail("the Dockerfile is not multi-stage")
builder, runtime = stages[0], stages[-1]

def stage_by_ref(ref, before):
    for index, stage in enumerate(stages[:before]):
        if stage["name"] == ref or str(index) == ref:
            return stage
    return None

# The builder: base image, the cargo build, and the paths its binaries end up at.
m = re.fullmatch(r"(?:docker\.io/)?(?:library/)?rust:(\d+)\.(\d+)(?:\.\d+)?-slim-([a-z]+)", builder["image"])
if not m:
    fail(f"the builder stage is {builder['image']!r}, expected rust:1.NN-slim-CODENAME")
rust_image = (int(m.group(1)), int(m.group(2)))
codename = m.group(3)
rm = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', read("Cargo.toml"), re.M)
if not rm:
    fail("Cargo.toml has no rust-version")
workspace_rust = (int(rm.group(1)), int(rm.group(2)))
if rust_image < workspace_rust:
    fail(f"the builder has Rust {rust_image[0]}.{rust_image[1]}, the workspace needs {workspace_rust[0]}.{workspace_rust[1]}")
facts["rust_image"] = f"{rust_image[0]}.{rust_image[1]}"
rm = re.fullmatch(r"(?:docker\.io/)?(?:library/)?debian:([a-z]+)-slim", runtime["image"])
if not rm:
    fail(f"the runtime stage is {runtime['image']!r}, expected debian:CODENAME-slim")
if rm.group(1) != codename:
    fail(f"builder (Debian {codename}) and runtime (Debian {rm.group(1)}) differ: the binaries need the builder's glibc")

produced, built_examples, context_copies = set(), set(), []
for number, instruction, rest in builder["ins"]:
    if instruction == "COPY" or instruction == "ADD":
        flags, args = flags_and_args(rest)
        if "from" not in flags:
            context_copies.extend(args[:-1])
    if instruction != "RUN":
        continue
    flags, words = flags_and_args(rest)
    cache_targets = set()
    for mount in flags.get("mount", []):
        options = dict(o.partition("=")[::2] for o in mount.split(","))
        if options.get("type") == "cache":
            cache_targets.add(os.path.normpath(os.path.join(builder["workdir"], options.get("target", ""))))
    commands = [[]]
    for word in words:
        if word in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(word)
    for argv in commands:
        if argv[:2] == ["cargo", "build"]:
            if "--release" not in argv or "--locked" not in argv:
                fail(f"Dockerfile:{number}: cargo build without --release --locked")
            examples = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--example"]
            examples += [a.split("=", 1)[1] for a in argv if a.startswith("--example=")]
            target = os.path.join(builder["workdir"], "target")
            for example in examples:
                if not (os.path.isfile(f"examples/{example}.rs") or os.path.isfile(f"examples/{example}/main.rs")):
                    fail(f"Dockerfile:{number}: builds example {example!r}, which examples/ does not have")
                built_examples.add(example)
                produced.add((os.path.join(target, "release", "examples", example), target in cache_targets))
        elif argv[:1] == ["cp"] and len(argv) >= 3:
            sources, dest = [a for a in argv[1:-1] if not a.startswith("-")], argv[-1]
            for source in sources:
                path = os.path.normpath(os.path.join(builder["workdir"], source))
                if any(path == p for p, _ in produced):
                    into = dest.endswith("/") or len(sources) > 1
                    out = os.path.join(dest, os.path.basename(path)) if into else dest
                    produced.add((os.path.normpath(os.path.join(builder["workdir"], out)), False))
if not built_examples:
    fail("the builder stage runs no `cargo build --example ...`")
in_image = {p for p, cached in produced if not cached}
if "COPY" in [i for _, i, _ in builder["ins"]] and "." not in context_copies:
    fail("the builder does not COPY the whole context (`COPY . .`)")

# The runtime: what it copies from the builder, and what it runs.
installed, path_dirs = {}, ("/usr/local/bin", "/usr/bin", "/bin")
user = None
for number, instruction, rest in runtime["ins"]:
    where = f"Dockerfile:{number} {instruction}"
    if instruction in ("COPY", "ADD"):
        flags, args = flags_and_args(rest)
        if len(args) < 2:
            fail(f"{where}: needs a source and a destination")
        sources, dest = args[:-1], args[-1]
        if "from" in flags:
            ref = flags["from"][0]
            stage = stage_by_ref(ref, stages.index(runtime))
            if stage is None:
                fail(f"{where}: --from={ref} names no earlier stage")
            if stage is builder:
                for source in sources:
                    path = os.path.normpath(os.path.join(builder["workdir"], source))
                    if path not in in_image:
                        fail(f"{where}: {source} is not a binary the builder's cargo build leaves in "
                             f"the image (it writes {sorted(p for p, _ in produced)}; cache mounts: not kept)")
        else:
            for source in sources:
                if not os.path.exists(source):
                    fail(f"{where}: {source} does not exist in the build context")
                if "chmod" not in flags and not os.access(source, os.X_OK) and dest.startswith(path_dirs):
                    fail(f"{where}: {source} is not executable")
                context_copies.append(source)
        for source in sources:
            into = dest.endswith("/") or len(sources) > 1
            target = os.path.join(dest, os.path.basename(source)) if into else dest
            installed[os.path.basename(target)] = os.path.dirname(target)
    elif instruction == "USER":
        user = rest.split(":")[0]
exposed = [w.split("/")[0] for _, i, r in runtime["ins"] if i == "EXPOSE" for w in r.split()]
for example in built_examples:
    if example not in installed:
        fail(f"the runtime stage does not copy the {example} binary")
if user in (None, "root", "0"):
    fail("the runtime stage runs as root (no USER, or USER root)")
cmd = [exec_form(r, f"Dockerfile:{n} CMD") for n, i, r in runtime["ins"] if i == "CMD"]
entrypoint = [i for _, i, _ in runtime["ins"] if i == "ENTRYPOINT"]
if entrypoint or not cmd:
    fail("the runtime stage should have a CMD and no ENTRYPOINT (compose's `command` names the program)")
for program, where in [(cmd[-1][0], "CMD")] + [(c, "docker-compose.yml node command") for c in facts["node_commands"]]:
    if installed.get(program) not in path_dirs:
        fail(f"{where} runs {program!r}, which the runtime stage does not install on PATH")
healthchecks = [r for _, i, r in runtime["ins"] if i == "HEALTHCHECK"]
if len(healthchecks) != 1:
    fail("the runtime stage should have one HEALTHCHECK")
hflags, _ = flags_and_args(healthchecks[0].split(" CMD ")[0]) if " CMD " in healthchecks[0] else ({}, [])
for key in ("interval", "timeout", "start-period"):
    for value in hflags.get(key, []):
        duration_seconds(value, f"HEALTHCHECK --{key}")
hcmd = exec_form(healthchecks[0].split("CMD", 1)[1].strip(), "HEALTHCHECK")
if installed.get(hcmd[0]) not in path_dirs:
    fail(f"HEALTHCHECK runs {hcmd[0]!r}, which the runtime stage does not install on PATH")
if installed.get("chat-healthcheck") not in path_dirs:
    fail("the nodes' healthcheck runs chat-healthcheck, which the runtime stage does not install on PATH")
addr_port = runtime["env"].get("CHAT_ADDR", "127.0.0.1:8000").rsplit(":", 1)[1]
if runtime["env"].get("CHAT_ADDR", "").rsplit(":", 1)[0] not in ("0.0.0.0", "[::]"):
    fail("the runtime stage's CHAT_ADDR should listen on all interfaces")
if exposed != [addr_port] or int(addr_port) != NODE_PORT:
    fail(f"EXPOSE {exposed}, CHAT_ADDR port {addr_port} and the nodes' port {NODE_PORT} should agree")
ok(f"Dockerfile: stages {[s['name'] for s in stages]}; builder rust {facts['rust_image']} on Debian {codename} "
   f">= rust-version {workspace_rust[0]}.{workspace_rust[1]}; `cargo build --release --locked` of "
   f"{', '.join(sorted(built_examples))} -> target/release/examples/NAME, copied from the builder; "
   f"runtime debian:{codename}-slim as user {user}, EXPOSE {addr_port}, CMD {cmd[-1]}, HEALTHCHECK {hcmd}")

# .dockerignore: leaves out the bulky and the secret, keeps what the build reads.
def dockerignore_patterns():
    patterns = []
    for line in read(".dockerignore").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[" and "]" in line[i:]:
                j = line.index("]", i)
                regex, i = regex + line[i:j + 1].replace("[!", "[^"), j + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns

IGNORE = dockerignore_patterns()
def ignored(path):
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for negate, regex in IGNORE:
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result

for path in ("target/release/x", ".git/HEAD", ".env", "tests-browser/node_modules/x/y.js",
             "chat.db", "chat.db-wal", "chat-core/target/x"):
    if not ignored(path):
        fail(f".dockerignore does not leave out {path}")
try:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split("\n")
    source_of_list = "git ls-files"
except (OSError, subprocess.CalledProcessError):
    files = [os.path.relpath(os.path.join(d, f)) for d, dirs, fs in os.walk(".")
             for f in fs if not {".git", "target", "node_modules"} & set(d.split(os.sep))]
    source_of_list = "the directory tree"
files = [f for f in files if f and os.path.exists(f)]
needed = set()
for f in files:
    base = os.path.basename(f)
    if (f.endswith(".rs") or base in ("Cargo.toml", "Cargo.lock", "rust-toolchain", "rust-toolchain.toml")
            or f.startswith((".cargo/", "examples/", "benches/")) or "/src/" in "/" + f):
        needed.add(f)
    if f.endswith(".rs"):
        for literal in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', read(f)):
            needed.add(os.path.normpath(os.path.join(os.path.dirname(f), literal)))
needed |= {os.path.normpath(c) for c in context_copies if c != "."}
left_out = sorted(f for f in needed if ignored(f))
if left_out:
    fail(f".dockerignore leaves out files the build reads: {left_out[:10]}")
ok(f".dockerignore leaves out target/, .git, .env, node_modules, chat.db*, and none of the "
   f"{len(needed)} files the build reads (sources, manifests, include_str! files such as README.md; from {source_of_list})")

with open(os.path.join(WORK, "facts"), "w") as f:
    f.write(f"RUST_IMAGE={facts['rust_image']}\n")
PYTHON
"$PY" "$WORK/check.py" "$WORK" || exit 1
# shellcheck disable=SC1091
. "$WORK/facts"

# ---------------------------------------------------------------------------------------------
# 1b. Docker Compose's own validation. Debian's docker-compose needs no container engine for
# `config`, and is installed without the one it recommends.
# ---------------------------------------------------------------------------------------------
: >"$WORK/empty.env"   # --env-file: ignore any .env here, take only what is given below
compose_env=(env -u CHAT_JWT_SECRET -u POSTGRES_PASSWORD)
compose_ok=(env CHAT_JWT_SECRET=check-deploy POSTGRES_PASSWORD=check-deploy)
validators=()
if docker compose version >/dev/null 2>&1; then
    validators+=("docker compose")
else
    not_checked "Docker Compose v2's plugin (\`docker compose\`): not installed here"
fi
if ! command -v docker-compose >/dev/null 2>&1; then
    install_debian docker-compose
fi
validators+=("docker-compose")
for validator in "${validators[@]}"; do
    read -r -a cmd <<<"$validator"
    version=$("${cmd[@]}" version 2>/dev/null | sed -n 1p)
    if ! out=$("${compose_ok[@]}" "${cmd[@]}" --env-file "$WORK/empty.env" -f docker-compose.yml config -q 2>&1); then
        echo "$out" >&2
        fail "$validator config rejects docker-compose.yml"
    fi
    if out=$("${compose_env[@]}" "${cmd[@]}" --env-file "$WORK/empty.env" -f docker-compose.yml config -q 2>&1); then
        fail "$validator accepts docker-compose.yml without CHAT_JWT_SECRET and POSTGRES_PASSWORD set"
    fi
    grep -q "CHAT_JWT_SECRET\|POSTGRES_PASSWORD" <<<"$out" \
        || fail "$validator refuses docker-compose.yml without the secrets but does not name them: $out"
    ok "$validator config validates docker-compose.yml ($version), and refuses it without the secrets"
done

# ---------------------------------------------------------------------------------------------
# 2. nginx -t on the copy check.py wrote.
# ---------------------------------------------------------------------------------------------
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    install_debian nginx
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
mkdir -p "$WORK/nginx-tmp"
if ! out=$("$NGINX" -t -q -e stderr -p "$WORK/" -c "$WORK/nginx.conf" -g "pid $WORK/nginx.pid;" 2>&1); then
    echo "$out" >&2
    fail "nginx -t rejects deploy/compose/nginx.conf (tested as $WORK/nginx.conf with the node names as 127.0.0.1 and 127.0.0.2)"
fi
ok "nginx -t accepts deploy/compose/nginx.conf ($("$NGINX" -v 2>&1 | sed 's/^nginx version: //'); node names as loopback addresses)"

# ---------------------------------------------------------------------------------------------
# 3b. Every locked dependency the image builds compiles with the builder's Rust, and none is a
# TLS library (the runtime stage installs neither libssl nor CA certificates).
# ---------------------------------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || fail "needs cargo to read the dependency graph (cargo metadata)"
case "$(uname -m)" in
    x86_64 | amd64) triple=x86_64-unknown-linux-gnu ;;
    aarch64 | arm64) triple=aarch64-unknown-linux-gnu ;;
    *) triple="$(uname -m)-unknown-linux-gnu" ;;
esac
cargo metadata --locked --format-version 1 --filter-platform "$triple" >"$WORK/metadata.json" 2>"$WORK/metadata.err" \
    || { cat "$WORK/metadata.err" >&2; fail "cargo metadata --locked failed (is Cargo.lock up to date?)"; }
"$PY" - "$WORK/metadata.json" "$RUST_IMAGE" "$triple" <<'PYTHON'
import json, sys
meta = json.load(open(sys.argv[1]))
image = tuple(int(x) for x in sys.argv[2].split("."))
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = next(p["id"] for p in meta["packages"] if p["name"] == "chat" and p["source"] is None)
# `cargo build --example` builds the root package's normal, build and dev dependencies, and the
# normal and build dependencies of those.
seen, stack = {root}, [root]
while stack:
    current = stack.pop()
    for dep in nodes[current]["deps"]:
        kinds = {k["kind"] for k in dep["dep_kinds"]}
        if current == root or kinds & {None, "build"}:
            if dep["pkg"] not in seen:
                seen.add(dep["pkg"])
                stack.append(dep["pkg"])
def version(text):
    return tuple(int(x) for x in text.split(".")[:2])
needs = sorted(((version(packages[i]["rust_version"]), packages[i]["name"], packages[i]["version"])
                for i in seen if packages[i].get("rust_version")), reverse=True)
newest = needs[0] if needs else ((0, 0), "-", "-")
if newest[0] > image:
    too_new = [f"{n} {v} (Rust {r[0]}.{r[1]})" for r, n, v in needs if r > image]
    print(f"check-deploy: FAILED: the builder's Rust {sys.argv[2]} is too old for {', '.join(too_new)}", file=sys.stderr)
    sys.exit(1)
TLS = {"openssl", "openssl-sys", "native-tls", "tokio-native-tls", "postgres-native-tls", "postgres-openssl",
       "rustls", "tokio-rustls", "tokio-postgres-rustls", "rustls-native-certs", "webpki-roots",
       "hyper-tls", "hyper-rustls"}
tls = sorted({packages[i]["name"] for i in seen} & TLS)
if tls:
    print(f"check-deploy: FAILED: the image would build TLS crates {tls}, and its runtime stage has no "
          "libssl or ca-certificates: install what they need in the Dockerfile", file=sys.stderr)
    sys.exit(1)
print(f"check-deploy: ok: the {len(seen)} packages the image builds for {sys.argv[3]} need at most Rust "
      f"{newest[0][0]}.{newest[0][1]} ({newest[1]} {newest[2]}), the builder has {sys.argv[2]}; no TLS crate among them")
PYTHON

if command -v hadolint >/dev/null 2>&1; then
    hadolint Dockerfile || fail "hadolint reports problems in the Dockerfile"
    ok "hadolint Dockerfile"
else
    not_checked "hadolint (optional): not installed"
fi

# ---------------------------------------------------------------------------------------------
# 4. The image's health probe against a local HTTP server: 200 passes, 503 and a closed port fail.
# ---------------------------------------------------------------------------------------------
"$PY" - "$WORK/probe-port" >/dev/null 2>&1 <<'PYTHON' &
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status = 200 if self.path == "/healthz" else 503
        body = b"ok\n" if status == 200 else b"not ready\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
with open(sys.argv[1] + ".new", "w") as f:
    f.write(str(server.server_address[1]))
import os; os.rename(sys.argv[1] + ".new", sys.argv[1])
server.serve_forever()
PYTHON
PROBE_SERVER_PID=$!
for _ in $(seq 50); do [ -s "$WORK/probe-port" ] && break; sleep 0.1; done
[ -s "$WORK/probe-port" ] || fail "the probe's test HTTP server did not start"
probe_port=$(cat "$WORK/probe-port")
CHAT_ADDR="0.0.0.0:$probe_port" bash deploy/docker/healthcheck /healthz \
    || fail "deploy/docker/healthcheck fails against a server answering 200"
if CHAT_ADDR="0.0.0.0:$probe_port" bash deploy/docker/healthcheck /readyz 2>/dev/null; then
    fail "deploy/docker/healthcheck passes against a server answering 503"
fi
kill "$PROBE_SERVER_PID" 2>/dev/null || true
wait "$PROBE_SERVER_PID" 2>/dev/null || true
PROBE_SERVER_PID=
if CHAT_ADDR="0.0.0.0:$probe_port" bash deploy/docker/healthcheck /healthz 2>/dev/null; then
    fail "deploy/docker/healthcheck passes with nothing listening"
fi
ok "deploy/docker/healthcheck: passes on 200, fails on 503 and on a closed port"

echo "check-deploy: all checks passed; no image was built and no container started (docs/deploy.md)"
