"""The chat template a checkpoint carries (tokenizer_config.json's `chat_template`), rendered safely.

Every Hugging Face checkpoint says how its conversations look in a jinja template; ours are
rendered the way `transformers`' `apply_chat_template` renders them (trim_blocks, lstrip_blocks,
the loopcontrols extension, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII
text, `{% generation %}` blocks, the special tokens as variables), with two differences:

  * Control tokens come only from the template. Hugging Face tokenizes the rendered text, so a
    user who types "<|im_end|>" ends their turn. Here every control-token text found in a message
    is marked before rendering (MARK put in front of it, and a MARK of the message doubled), so
    that after rendering we can tell the template's control tokens from the messages' text:
    `segments` returns the rendered text cut at the template's control tokens only. A template
    that looks inside a message for a control token's text ("'</think>' in message.content")
    therefore does not find it either: to the template too, typed text is only text.
  * The template is untrusted input (it comes with a downloaded checkpoint), so it runs in
    jinja2's ImmutableSandboxedEnvironment, which refuses Python internals (`''.__class__`) and
    mutating methods, and within budgets that jinja's sandbox does not set: MAX_STEPS loop
    iterations and calls, MAX_SECONDS of wall clock, MAX_CHARS of text in any value or in all the
    output together, MAX_BITS in a number. They are checked where time is spent or values grow:
    every loop iteration and call (macros included), the operators that build (+ * % **) and `~`,
    every filter, every piece of output (in macros and `set` blocks too), and the arguments of the
    builtins that can build a large value in one step (a huge number, a huge format width, a
    `replace` or `join` whose result would pass MAX_CHARS). So a template that loops forever or
    builds a gigabyte stops with an error before it gets there. Not bounded: the time of one
    builtin operation on values within those sizes (they are at worst quadratic in MAX_CHARS).
    The caller's own `variables` (e.g. date_string) are not marked: they are the program's input.

Every error is a ChatTemplateError naming the tokenizer_config.json it came from.
"""

import datetime
import functools
import json
import re
import threading
import time

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

MAX_CHARS = 4_000_000     # characters in any value and in the whole output (a prompt has thousands)
MAX_STEPS = 1_000_000     # loop iterations + calls in one rendering (a real template makes < 1000)
MAX_SECONDS = 5.0         # wall clock for one rendering (a real one takes well under a millisecond)
MAX_SOURCE = 1_000_000    # characters of template source (real ones have 1 to 20 thousand)
MAX_BITS = 100_000        # bits of a number (a date or an index needs 64)

# Private-use characters that mark control-token text inside messages. The first of them that the
# template itself does not contain is used, so that the template cannot forge an escape.
MARK_CANDIDATES = [chr(c) for c in range(0xE000, 0xE100)]


class ChatTemplateError(ValueError):
    pass


class TemplateRefused(jinja2.TemplateError):
    """What a template's raise_exception('...') raises: it refuses the messages it was given."""


def template_source(value, path):
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} of which
    "default" is the chat template (the others, e.g. "tool_use", are for other requests)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{path}: chat_template is a list without a template named "
                                    f"'default' (found {sorted(map(str, named))})")
        value = named["default"]
    if not isinstance(value, str):
        raise ChatTemplateError(f"{path}: chat_template must be a string or a list of "
                                f"{{'name', 'template'}}, found {type(value).__name__}")
    if len(value) > MAX_SOURCE:
        raise ChatTemplateError(f"{path}: chat_template has {len(value)} characters; more than "
                                f"{MAX_SOURCE} is not a chat template")
    return value


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for transformers'
    assistant masks; for rendering it is its body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class Budget:
    """What one rendering may still spend (see the module docstring)."""

    def __init__(self):
        self.steps, self.chars = 0, 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self):
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise SecurityError(f"more than {MAX_STEPS} loop iterations and calls")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise SecurityError(f"rendering took more than {MAX_SECONDS} s")


def check_length(n):
    """Refuse to build a value of n characters or items, too large to be a part of a prompt."""
    if n > MAX_CHARS:
        raise SecurityError(f"a value of {n} items or characters (at most {MAX_CHARS})")


def check_bits(n):
    if n > MAX_BITS:
        raise SecurityError(f"a number of {n} bits (at most {MAX_BITS})")


def check_size(value):
    """Refuse a value, once made, that is too large to be a part of a prompt."""
    if isinstance(value, (str, list, tuple, dict)):
        check_length(len(value))
    elif isinstance(value, int):
        check_bits(value.bit_length())
    return value


def check_numbers(values):
    """Refuse a number larger than MAX_CHARS given to a builtin, which could build a value that
    large in one step (`'x'.ljust(10**10)`, `'x'|center(10**10)`, `'%*d' % (10**10, 1)`)."""
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CHARS:
            raise SecurityError(f"the number {v} (at most {MAX_CHARS} here)")


# A width or precision of 8 digits or more in a %-format or a {}-format
HUGE_FORMAT = re.compile(r"%[-+ #0]*(\d*\.)?\d{8}|\{[^{}]*:[^{}]*\d{8}")


def check_format(fmt):
    """A format string may not ask for a huge width or precision (`'{:>9999999999}'`)."""
    if isinstance(fmt, str) and HUGE_FORMAT.search(fmt):
        raise SecurityError("a format string with a width or precision of 8 digits or more")


def check_replace(text, old, new):
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        count = text.count(old) if old else len(text) + 1
        check_length(len(text) + count * len(new))


def check_join(sep, parts):
    if isinstance(sep, str) and isinstance(parts, (list, tuple)):
        check_length(len(sep) * len(parts) + sum(len(str(p)) for p in parts[:MAX_CHARS]))


def check_method(func, args):
    """The str methods whose result can be far larger than their inputs."""
    # (jinja wraps str.format in a function of its own: the string is its __wrapped__'s __self__)
    owner = getattr(getattr(func, "__wrapped__", func), "__self__", None)
    name = getattr(func, "__name__", "")
    if not isinstance(owner, str):
        return
    if name in ("format", "format_map"):
        check_format(owner)
    elif name == "replace" and len(args) >= 2:
        check_replace(owner, args[0], args[1])
    elif name == "join" and args:
        check_join(owner, args[0])


# The filters of that kind, by their arguments after jinja's eval context.
FILTER_CHECKS = {"format": lambda fmt, *a, **k: check_format(fmt),
                 "replace": lambda s, old="", new="", *a, **k: check_replace(s, old, new),
                 "join": lambda parts, d="", *a, **k: check_join(d, parts)}


class Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, plus budgets: every call, operator, loop iteration and piece of
    output passes through one of the methods below (the template's syntax tree is rewritten so)."""
    intercepted_binops = frozenset(["+", "*", "%", "**"])  # those that can build large values

    def __init__(self, now):
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[jinja2.ext.loopcontrols, GenerationBlock])
        self.local = threading.local()  # the Budget of the rendering under way on this thread
        del self.globals["lipsum"]  # builds as much text as asked; no chat template uses it

        def raise_exception(message):
            raise TemplateRefused(str(message))

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' own: jinja's escapes HTML characters, which a prompt must keep
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        self.globals.update(raise_exception=raise_exception,
                            strftime_now=lambda fmt: now().strftime(fmt))
        self.filters["tojson"] = tojson
        self.filters = {name: self.checked_filter(name, f) for name, f in self.filters.items()}
        # The checks Guard inserts, as filters: jinja calls a filter directly (a call goes through
        # the sandbox's checks), and these names are no identifiers, so no template can name them.
        # pass_context keeps jinja from running them at compile time on constant text.
        self.filters.update({
            "(loop)": jinja2.pass_context(lambda context, items: self.guard_loop(items)),
            "(emit)": jinja2.pass_context(lambda context, value: self.emit(value)),
            "(concat)": jinja2.pass_context(lambda context, value: check_size(value))})

    def unsafe_undefined(self, obj, attribute):
        # jinja returns an undefined value that fails only when used; a template that reaches for
        # Python internals is hostile, so it stops at once
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def budget(self):
        return getattr(self.local, "budget", None) or Budget()  # (no rendering under way: a new one)

    @staticmethod
    def checked_filter(name, f):
        special = FILTER_CHECKS.get(name)
        skip = 1 if getattr(f, "jinja_pass_arg", None) else 0  # the context jinja passes first

        @functools.wraps(f)  # keeps jinja's pass_context & co. markers
        def checked(*args, **kwargs):
            check_numbers([*args, *kwargs.values()])
            if special:
                special(*args[skip:], **kwargs)
            return check_size(f(*args, **kwargs))
        return checked

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        __self.budget().step()
        check_numbers([*args, *kwargs.values()])
        check_method(__obj, args)
        return check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            check_bits(abs(left).bit_length() * right)  # about the result's bits
        if operator == "*" and ints:
            check_bits(abs(left).bit_length() + abs(right).bit_length())
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    check_length(len(seq) * max(n, 0))
        if operator == "%" and isinstance(left, str):
            check_format(left)
            check_numbers(right if isinstance(right, tuple) else [right])
        if operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
                check_length(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def guard_loop(self, iterable):
        budget = self.budget()
        for item in iterable:
            budget.step()
            yield item

    def emit(self, value):
        """Every piece of output, literal or computed, at any depth (macros, set blocks)."""
        text = str(value)
        budget = self.budget()
        budget.chars += len(text)
        if budget.chars > MAX_CHARS:
            raise SecurityError(f"more than {MAX_CHARS} characters of output")
        return text


class Guard(NodeTransformer):
    """Routes every loop, `~` and output of a parsed template through the Sandbox's checks."""

    @staticmethod
    def via(check, node):
        return nodes.Filter(node, check, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = self.via("(loop)", node.iter)
        return node

    def visit_Concat(self, node):
        return self.via("(concat)", self.generic_visit(node))

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [self.via("(emit)", n) for n in node.nodes]
        return node


class ChatTemplate:
    """A checkpoint's chat template, compiled once.

    `variables`: what transformers passes besides the messages, i.e. the special tokens by role
    (bos_token, eos_token, unk_token, pad_token). `special_texts`: every control token's text.
    `now`: the clock `strftime_now` reads (Llama 3.1 writes today's date into the system header),
    datetime.now unless a test fixes it."""

    def __init__(self, source, special_texts, path="tokenizer_config.json", variables=None,
                 now=datetime.datetime.now):
        self.path = path
        source = template_source(source, path)
        self.mark = next((m for m in MARK_CANDIDATES if m not in source), None)
        if self.mark is None:
            raise ChatTemplateError(f"{path}: chat_template uses every character U+E000-U+E0FF")
        self.env = Sandbox(now)
        try:
            tree = Guard().visit(self.env.parse(source))
            self.template = self.env.from_string(tree)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{path}: chat_template line {e.lineno}: {e.message}") from None
        self.variables = {k: v for k, v in (variables or {}).items() if v is not None}
        # Longest first, so that at one position the longest control token wins (as Hugging Face's
        # matching of added tokens does). An escaped one in a message is MARK + its text; MARK MARK
        # is the message's own MARK; anything else is the template's control token.
        alternatives = "|".join(map(re.escape, sorted(special_texts, key=len, reverse=True)))
        m = re.escape(self.mark)
        self.in_message = re.compile(f"{m}|{alternatives}" if alternatives else m)
        self.in_output = re.compile(f"{m}{m}|{m}(?:{alternatives})|{m}|({alternatives})"
                                    if alternatives else f"{m}{m}|{m}")

    def escape(self, value):
        """A message's strings with MARK before each control-token text and before each MARK."""
        if isinstance(value, str):
            return self.in_message.sub(lambda t: self.mark + t.group(), value)
        if isinstance(value, dict):
            return {k: self.escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape(v) for v in value]
        return value

    def render_marked(self, messages, add_generation_prompt=True, **variables):
        self.env.local.budget = Budget()
        try:
            return self.template.render(
                {**self.variables, "tools": None, "documents": None, **variables,
                 "messages": self.escape(list(messages)), "add_generation_prompt": add_generation_prompt})
        except SecurityError as e:
            raise ChatTemplateError(f"{self.path}: the chat template was stopped: {e}") from None
        except TemplateRefused as e:
            raise ChatTemplateError(f"{self.path}: the chat template refuses these messages: "
                                    f"{e.message}") from None
        except (RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"{self.path}: the chat template was stopped: "
                                    f"{type(e).__name__}") from None
        except Exception as e:  # e.g. 'str' + int inside the template: the template's error
            raise ChatTemplateError(f"{self.path}: the chat template failed on these messages: "
                                    f"{type(e).__name__}: {e}") from None
        finally:
            self.env.local.budget = None

    def segments(self, messages, add_generation_prompt=True, continue_final_message=False, **variables):
        """[(text, is_control_token), ...]: the rendered conversation, cut at the control tokens
        that the template wrote (never at those typed in a message). Empty texts are left out.

        continue_final_message: the last message is the start of the assistant's answer (a
        prefill), which the model continues: the rendering stops right after its text, with no
        end of turn; as transformers does it (the rendering cut after the last place the
        message's text occurs, stripped, when the template may have trimmed it)."""
        text = self.render_marked(messages, add_generation_prompt and not continue_final_message,
                                  **variables)
        if continue_final_message:
            text = self.cut_after(text, self.escape(messages[-1].get("content") if messages else None))
        out, plain, start = [], "", 0
        for t in self.in_output.finditer(text):
            plain += text[start:t.start()]
            if t.group(1) is None:  # MARK MARK -> MARK, MARK + text -> text, a lone MARK -> ''
                plain += t.group()[1:]
            else:
                out += [(plain, False)] if plain else []
                out.append((t.group(1), True))
                plain = ""
            start = t.end()
        plain += text[start:]
        return out + ([(plain, False)] if plain else [])

    def cut_after(self, text, final):
        if not isinstance(final, str) or not final.strip() or final.strip() not in text:
            raise ChatTemplateError(f"{self.path}: cannot continue the final message: its text "
                                    f"{str(final)[:60]!r} is not in what the chat template wrote")
        at = text.rindex(final.strip())
        if text[at:at + len(final.lstrip())] == final:  # the template kept the text as it was
            return text[:at + len(final.lstrip())]
        return text[:at + len(final.strip())]

    def render(self, messages, add_generation_prompt=True, continue_final_message=False, **variables):
        """The rendered text, as Hugging Face's apply_chat_template(tokenize=False) gives it."""
        return "".join(t for t, _ in self.segments(messages, add_generation_prompt,
                                                   continue_final_message, **variables))


def fold_system(messages):
    """The first message, when it is a system message, put in front of the first user message's
    text with a blank line between, for templates that take no system message (Mistral's v0.1
    instruct format; mistral-common folds the system prompt into a user turn the same way)."""
    messages = list(messages)
    if not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    for i, m in enumerate(rest):
        if m.get("role") == "user":
            rest[i] = {**m, "content": f"{system}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]
