#!/usr/bin/env python3
"""Writes tests/data/chat_templates/reference.json: chat templates rendered by Python's jinja2.

The environment is the one transformers builds for apply_chat_template
(transformers/utils/chat_template_utils.py): an ImmutableSandboxedEnvironment with
trim_blocks=True, lstrip_blocks=True, the loopcontrols extension, raise_exception(message) and
tojson as json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...).

Two parts:
  "chats": the chat templates of Llama-2, Llama-3, Mistral (v0.1, and a v0.3-style one), ChatML
     (Qwen2, SmolLM2), Gemma, Phi-3 and Zephyr as their tokenizer_config.json files carry them,
     each with several conversations (with and without a system prompt, multi-turn, quotes,
     newlines, unicode), add_generation_prompt true and false, and the model's bos/eos tokens.
     A case the template refuses (raise_exception) records the message instead of the text.
  "constructs": small templates with a JSON context, one Jinja construct each, for the engine's
     unit test (tests/tokenizer/jinja_test.cpp checks both parts).

Usage: pip install jinja2 && python3 tools/make_chat_template_reference.py
"""
import json
import os
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "chat_templates",
                   "reference.json")


class TemplateRaised(Exception):
    pass


def raise_exception(message):
    raise TemplateRaised(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' definition (jinja2's own tojson would HTML-escape).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


# --- the templates, as tokenizer_config.json carries them (Jinja escapes kept as written) -------

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}")

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")

TEMPLATES = {
    "llama2": (LLAMA2, "<s>", "</s>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral_v0.1": (MISTRAL_V01, "<s>", "</s>"),
    "mistral_v0.3": (MISTRAL_V03, "<s>", "</s>"),
    "qwen2": (QWEN2, "", "<|im_end|>"),
    "smollm2": (SMOLLM2, "<|im_start|>", "<|im_end|>"),
    "gemma": (GEMMA, "<bos>", "<eos>"),
    "phi3": (PHI3, "<s>", "<|endoftext|>"),
    "zephyr": (ZEPHYR, "<s>", "</s>"),
}

TRICKY = ("  He said \"hi\" & it's 'fine' \\o/ {{ not a tag }} {% neither %}\n"
          "Line two\n\n\tTabbed — café 日本語 🚀  ")

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello, what's your name."}],
    "system_user": [{"role": "system", "content": "You are a terse assistant."},
                    {"role": "user", "content": "Hello, what's your name."}],
    "multi_turn": [{"role": "user", "content": "What is 2 + 2?"},
                   {"role": "assistant", "content": "4."},
                   {"role": "user", "content": "And times 3?"}],
    "system_multi_turn": [{"role": "system", "content": "Answer in French."},
                          {"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": " Bonjour ! "},
                          {"role": "user", "content": "How are you?"},
                          {"role": "assistant", "content": "Très bien."}],
    "tricky_content": [{"role": "system", "content": "Quote: \"x\"\nand 'y'"},
                       {"role": "user", "content": TRICKY},
                       {"role": "assistant", "content": "Ünïcödé ✓\n```\ncode\n```"},
                       {"role": "user", "content": "\n"}],
    "two_users": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
    "other_role": [{"role": "user", "content": "hi"}, {"role": "critic", "content": "meh"}],
}


def render(env, template, context):
    try:
        return {"expected": env.from_string(template).render(**context)}
    except TemplateRaised as e:
        return {"error": str(e)}


# --- constructs: one Jinja feature each, with a context --------------------------------------

CONSTRUCTS = [
    ("output", "a{{ x }}b{{ 1 + 2 }}{{ 'q' }}", {"x": "X"}),
    ("comment", "a{# no #}b{#- strip -#}  c", {}),
    ("trim_blocks", "{% if true %}\nyes\n{% endif %}\nend", {}),
    ("lstrip_blocks", "  {% if true %}\n  in\n  {% endif %}\n  {{ 'v' }}\n", {}),
    ("dash_control", "a  {{- ' b ' -}}  c\n  {%- if true -%}  d  {%- endif -%}\n e", {}),
    ("plus_control", "  {%+ if true %}x{% endif +%}\ny", {}),
    ("trailing_newline", "text\n", {}),
    ("for_loop", "{% for x in xs %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.length }}:{{ x }}"
     "{{ ',' if not loop.last }}{% if loop.first %}F{% endif %}{% endfor %}", {"xs": ["a", "b", "c"]}),
    ("for_revindex", "{% for x in 'abc' %}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.previtem }}"
     "{{ loop.nextitem }}{{ loop.cycle('o', 'e') }}{% endfor %}", {}),
    ("for_else", "{% for x in [] %}x{% else %}empty{% endfor %}", {}),
    ("for_filter", "{% for x in range(10) if x is odd %}{{ x }}{% endfor %}", {}),
    ("for_dict", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}",
     {"d": {"b": 1, "a": [1, 2]}}),
    ("for_break_continue", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}"
     "{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
    ("nested_loops", "{% for a in [1,2] %}{% for b in [3,4] %}{{ a * b }}{{ loop.index }}{% endfor %}"
     "{{ loop.index }}{% endfor %}", {}),
    ("if_elif_else", "{% for x in [1, 2, 3] %}{% if x == 1 %}one{% elif x == 2 %}two{% else %}many"
     "{% endif %}{% endfor %}", {}),
    ("set_scoping", "{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}", {}),
    ("namespace", "{% set ns = namespace(found=false, n=0) %}{% for m in ms %}{% if m == 'b' %}"
     "{% set ns.found = true %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.found }} {{ ns.n }}",
     {"ms": ["a", "b"]}),
    ("set_block", "{% set s %}[{{ 1 }}]{% endset %}{{ s }}{{ s | length }}", {}),
    ("set_tuple", "{% set a, b = 1, 'two' %}{{ a }}{{ b }}", {}),
    ("macro", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}"
     "{{ greet('A') }} {{ greet('B', '?') }} {{ greet(name='C', punct='.') }}", {}),
    ("literals", "{{ 'a\\tb\\'c\"' }}|{{ \"d\\ne\" }}|{{ 42 }}|{{ -3.5 }}|{{ 1e3 }}|{{ [1, 'x', none] }}|"
     "{{ {'k': true, 'j': None} }}|{{ True }}|{{ (1, 2) }}|{{ 0.1 + 0.2 }}|{{ 1.0 }}|{{ 10 / 4 }}", {}),
    ("string_escapes", "{{ '\\u00e9\\x41\\\\n\\q' }}", {}),
    ("arithmetic", "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 7 / 2 }} "
     "{{ 'ab' * 3 }} {{ [1] + [2] }} {{ 'a' ~ 1 ~ none }} {{ 3 - 5 }} {{ 2 * 3 + 1 }} {{ 1.5 * 2 }}", {}),
    ("comparisons", "{{ 1 < 2 < 3 }} {{ 1 == 1.0 }} {{ 'a' != 'b' }} {{ 'ab' in 'cabd' }} "
     "{{ 3 not in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 2 >= 3 }} {{ [1, 2] == [1, 2] }} "
     "{{ not 1 and 2 }} {{ 0 or 'x' }} {{ none or [] }}", {}),
    ("tests", "{{ x is defined }}{{ y is defined }}{{ y is undefined }}{{ none is none }}"
     "{{ 'a' is string }}{{ d is mapping }}{{ 3 is number }}{{ 3 is integer }}{{ 3.0 is float }}"
     "{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ x is not none }}{{ [1] is iterable }}"
     "{{ true is boolean }}{{ 'ab' is lower }}{{ 1 is sameas 1 }}{{ 'a' is in 'ab' }}"
     "{{ 2 is eq 2 }}{{ 3 is gt 2 }}", {"x": 1, "d": {}}),
    ("undefined", "[{{ missing }}][{{ missing | default('dflt') }}][{{ '' | default('e', true) }}]"
     "[{{ missing | length }}][{% if missing %}t{% else %}f{% endif %}][{{ d.nokey }}][{{ d['nokey'] }}]"
     "[{% for x in missing %}{{ x }}{% endfor %}][{{ missing ~ 'x' }}]", {"d": {"a": 1}}),
    ("attributes", "{{ m.role }} {{ m['content'] }} {{ xs[0] }} {{ xs[-1] }} {{ xs.1 }} {{ s[1] }}",
     {"m": {"role": "user", "content": "c"}, "xs": [1, 2, 3], "s": "héllo"}),
    ("slicing", "{{ xs[1:] }} {{ xs[:2] }} {{ xs[::-1] }} {{ xs[::2] }} {{ xs[-2:] }} {{ s[1:3] }} "
     "{{ s[::-1] }} {{ xs[5:] }}", {"xs": [1, 2, 3, 4], "s": "añbc"}),
    ("filters_text", "{{ '  a b  ' | trim }}|{{ 'ab' | upper }}|{{ 'AB' | lower }}|{{ 'hello world' | capitalize }}|"
     "{{ 'hello big-world' | title }}|{{ 'aXbX' | replace('X', '-') }}|{{ 'xxa' | trim('x') }}|"
     "{{ 5 | string }}|{{ '12' | int + 1 }}|{{ 'x' | int }}|{{ 3.7 | int }}|{{ '2.5' | float }}|{{ 'a' | safe }}", {}),
    ("filters_list", "{{ xs | length }}|{{ xs | join(', ') }}|{{ xs | first }}|{{ xs | last }}|"
     "{{ 'abc' | list }}|{{ xs | reverse | list }}|{{ [3, 1, 2] | sort }}|{{ [1, 2, 1] | unique | list }}|"
     "{{ [1, 2, 3] | sum }}|{{ [4, 9] | max }}|{{ 'héllo' | length }}|{{ d | items | list }}|{{ d | length }}",
     {"xs": ["a", "b", "c"], "d": {"x": 1, "y": 2}}),
    ("filters_attr", "{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='content') | join }}|"
     "{{ ms | rejectattr('role', 'equalto', 'user') | list | length }}|{{ ms | map(attribute='role') | list }}|"
     "{{ [0, 1, 2] | select | list }}|{{ [0, 1, 2] | reject('odd') | list }}|{{ ['a', 'b'] | map('upper') | join }}|"
     "{{ ms | selectattr('tool') | list }}|{{ ms | join(',', attribute='role') }}",
     {"ms": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "u2"}]}),
    ("tojson", "{{ v | tojson }}\n{{ v | tojson(indent=2) }}\n{{ 'é\"\\n' | tojson }}\n{{ [] | tojson(indent=2) }}"
     "\n{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}",
     {"v": {"name": "get_weather", "args": [1, 2.5, True, None, "x"], "nested": {"k": {}}}}),
    ("string_methods", "{{ ' a '.strip() }}|{{ 'xa'.lstrip('x') }}|{{ 'a  '.rstrip() }}|{{ 'a,b,c'.split(',') }}|"
     "{{ ' a  b '.split() }}|{{ 'a,b,c'.split(',', 1) }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith(('x', 'c')) }}|"
     "{{ 'ab'.upper() }}|{{ 'AB'.lower() }}|{{ 'ab cd'.title() }}|{{ 'aa'.replace('a', 'b', 1) }}|"
     "{{ '-'.join(['x', 'y']) }}|{{ 'abc'.find('c') }}|{{ '{} and {}'.format(1, 'b') }}|{{ 'a\\nb'.splitlines() }}", {}),
    ("dict_methods", "{{ d.get('a') }}|{{ d.get('z') }}|{{ d.get('z', 5) }}|{{ d.keys() | list }}|"
     "{{ d.values() | list }}|{% for k, v in d.items() %}{{ k }}{{ v }}{% endfor %}", {"d": {"a": 1, "b": 2}}),
    ("conditional_expr", "{{ 'y' if x else 'n' }}{{ 'y' if not x else 'n' }}[{{ 'y' if false }}]", {"x": True}),
    ("filter_precedence", "{{ 'a' + ' b ' | trim + 'c' }}|{{ -2 | abs }}|{{ (1 + 2) | string + '!' }}", {}),
    ("raw_block", "{% raw %}{{ not rendered }}{% endraw %}", {}),
    ("filter_block", "{% filter upper %}hello {{ 'x' }}{% endfilter %}", {}),
    ("whitespace_lines", "{% for m in ms %}\n    {{ m }}\n{% endfor %}\n", {"ms": [1, 2]}),
    ("python_str", "{{ [1.5, 'it\\'s', {'a': none}] }}|{{ 1e20 }}|{{ 0.0001 }}|{{ 123456789.0 }}|{{ -0.0 }}", {}),
    ("raise", "{% if true %}{{ raise_exception('custom failure: ' ~ n) }}{% endif %}", {"n": 3}),
]


def main():
    env = environment()
    chats = []
    for name, (template, bos, eos) in TEMPLATES.items():
        for conv_name, messages in CONVERSATIONS.items():
            for gen in (False, True):
                case = {"template": name, "conversation": conv_name, "add_generation_prompt": gen}
                case.update(render(env, template, {"messages": messages, "add_generation_prompt": gen,
                                                   "bos_token": bos, "eos_token": eos}))
                chats.append(case)
    constructs = []
    for name, template, context in CONSTRUCTS:
        case = {"name": name, "template": template, "context": context}
        case.update(render(env, template, context))
        constructs.append(case)
    out = {
        "generator": "tools/make_chat_template_reference.py",
        "jinja2_version": jinja2.__version__,
        "templates": {k: {"template": t, "bos_token": b, "eos_token": e}
                      for k, (t, b, e) in TEMPLATES.items()},
        "conversations": CONVERSATIONS,
        "chats": chats,
        "constructs": constructs,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    errors = sum("error" in c for c in chats)
    print(f"wrote {OUT}: {len(chats)} chats ({errors} raise), {len(constructs)} constructs",
          file=sys.stderr)


if __name__ == "__main__":
    main()
