"""The requests of the Qwen repository's OpenAI-API examples, sent with the
client they are written for (openai 0.28, its module-level API).

Run by tests/serving/test_qwen_clients.py in a side virtualenv that has only
that client: `python qwen_examples_client.py API_BASE`. The conversations are
the examples' own (their function-call examples, with Qwen's function form and
OpenAI's, and the README's streaming and non-streaming snippets), as data; the
assistant turns between calls are the examples' scripted ones, not the model's.
Prints one JSON list: what each call returned.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import openai

QWEN_FORM_FUNCTIONS = [
    {
        "name_for_human": "谷歌搜索",
        "name_for_model": "google_search",
        "description_for_model": "谷歌搜索是一个通用搜索引擎，可用于访问互联网、"
        "查询百科知识、了解时事新闻等。 Format the arguments as a JSON object.",
        "parameters": [
            {
                "name": "search_query",
                "description": "搜索关键词或短语",
                "required": True,
                "schema": {"type": "string"},
            }
        ],
    },
    {
        "name_for_human": "文生图",
        "name_for_model": "image_gen",
        "description_for_model": "文生图是一个AI绘画（图像生成）服务，输入文本描述，"
        "返回根据文本作画得到的图片的URL。 Format the arguments as a JSON object.",
        "parameters": [
            {
                "name": "prompt",
                "description": "英文关键词，描述了希望图像具有什么内容",
                "required": True,
                "schema": {"type": "string"},
            }
        ],
    },
]
OPENAI_FORM_FUNCTIONS = [
    {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "The city and state, e.g. San Francisco, CA",
                },
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    }
]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str | None, call: tuple[str, str] | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if call is not None:
        message["function_call"] = {"name": call[0], "arguments": call[1]}
    return message


def result(name: str, content: str) -> dict[str, Any]:
    return {"role": "function", "name": name, "content": content}


def plain_chat() -> list[list[dict[str, Any]]]:
    """A multi-turn chat without functions: the conversation before each call."""
    turns = [
        [user("你好")],
        [
            assistant("你好！很高兴为你提供帮助。"),
            user("讲一个创业成功的故事，只要一句话。"),
        ],
        [
            assistant("李明从小工厂起步，最终成为了成功的企业家。"),
            user("给这个故事起一个标题"),
        ],
    ]
    calls, messages = [], []
    for turn in turns:
        messages = messages + turn
        calls.append(messages)
    return calls


def qwen_form_calls() -> list[list[dict[str, Any]]]:
    steps = [
        [user("你好")],
        [assistant("你好！很高兴见到你。有什么我可以帮忙的吗？"), user("谁是周杰伦")],
        [
            assistant(
                "Thought: 我应该使用Google搜索查找相关信息。",
                ("google_search", '{"search_query": "周杰伦"}'),
            ),
            result("google_search", "Jay Chou is a Taiwanese singer."),
        ],
        [assistant("周杰伦（Jay Chou）是一位来自台湾的歌手。"), user("他老婆是谁")],
        [
            assistant(
                "Thought: 我应该使用Google搜索查找相关信息。",
                ("google_search", '{"search_query": "周杰伦 老婆"}'),
            ),
            result("google_search", "Hannah Quinlivan"),
        ],
        [
            assistant("周杰伦的老婆是Hannah Quinlivan。"),
            user("给我画个可爱的小猫吧，最好是黑猫"),
        ],
        [
            assistant(
                "Thought: 我应该使用文生图API来生成一张可爱的小猫图片。",
                ("image_gen", '{"prompt": "cute black cat"}'),
            ),
            result("image_gen", '{"image_url": "https://example.com/cat.png"}'),
        ],
    ]
    calls, messages = [], []
    for step in steps:
        messages = messages + step
        calls.append(messages)
    return calls


def openai_form_calls() -> list[list[dict[str, Any]]]:
    first = [user("波士顿天气如何？")]
    second = first + [
        assistant(None, ("get_current_weather", '{"location": "Boston, MA"}')),
        result(
            "get_current_weather",
            '{"temperature": "22", "unit": "celsius", "description": "Sunny"}',
        ),
    ]
    return [first, second]


def reply(response: Any) -> dict[str, Any]:
    choice = response.choices[0]
    call = choice.message.get("function_call")
    return {
        "content": choice.message.get("content"),
        "function_call": None
        if call is None
        else {"name": call["name"], "arguments": call["arguments"]},
        "finish_reason": choice.finish_reason,
    }


def main(api_base: str) -> None:
    openai.api_base = api_base
    openai.api_key = "none"
    out: list[dict[str, Any]] = []
    for messages in plain_chat():
        response = openai.ChatCompletion.create(model="Qwen", messages=messages)
        out.append({"example": "chat", **reply(response)})
    for functions, conversations, example in (
        (QWEN_FORM_FUNCTIONS, qwen_form_calls(), "qwen-form"),
        (OPENAI_FORM_FUNCTIONS, openai_form_calls(), "openai-form"),
    ):
        for messages in conversations:
            response = openai.ChatCompletion.create(
                model="Qwen", messages=messages, functions=functions
            )
            out.append({"example": example, "functions": functions, **reply(response)})
    # The README's two snippets: a stream read as it reads it, then stop=[].
    pieces, finishes = [], []
    for chunk in openai.ChatCompletion.create(
        model="Qwen", messages=[user("你好")], stream=True
    ):
        if hasattr(chunk.choices[0].delta, "content"):
            pieces.append(chunk.choices[0].delta.content)
        finishes.append(chunk.choices[0].finish_reason)
    out.append({"example": "readme-stream", "pieces": pieces, "finishes": finishes})
    response = openai.ChatCompletion.create(
        model="Qwen", messages=[user("你好")], stream=False, stop=[]
    )
    out.append({"example": "readme", **reply(response)})
    models = openai.Model.list()
    out.append({"example": "models", "ids": [m["id"] for m in models["data"]]})
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
