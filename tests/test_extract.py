import pytest

from pva_sae.extract import extract_program

CASES = {
    "clean function": ("\ndef add(a, b):\n    return a + b\n", "def add(a, b):\n    return a + b"),
    "function then asserts": ("\ndef add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n",
                              "def add(a, b):\n    return a + b"),
    "function then prints": ("\ndef sq(x):\n    return x * x\nprint(sq(3))\n", "def sq(x):\n    return x * x"),
    "helper and main": ("\ndef _h(x):\n    return x % 2\n\n\ndef count_odd(xs):\n    return sum(_h(x) for x in xs)\n",
                        "def _h(x):\n    return x % 2\n\n\ndef count_odd(xs):\n    return sum(_h(x) for x in xs)"),
    "imports kept": ("\nimport re\nfrom math import sqrt\ndef f(s):\n    return re.sub('a', 'b', s), sqrt(4)\n",
                     "import re\nfrom math import sqrt\ndef f(s):\n    return re.sub('a', 'b', s), sqrt(4)"),
    "class based": ("\nclass Pair:\n    def __init__(self, a, b):\n        self.a = a\n\ndef max_chain(p):\n    return 1\n"
                    "\nif __name__ == '__main__':\n    print(max_chain(1))\n",
                    "class Pair:\n    def __init__(self, a, b):\n        self.a = a\n\ndef max_chain(p):\n    return 1"),
    "truncated mid-function": ("\ndef a(x):\n    return x\n\ndef b(y):\n    for i in range(y):\n        if i >",
                               "def a(x):\n    return x"),
    "prose after code": ("\ndef f(x):\n    return -x\n\nWrite a function to reverse a list.\n\ndef g(l):\n    return l[::-1]\n",
                         "def f(x):\n    return -x"),
    "fenced": ("\n```python\ndef f(x):\n    return 2 * x\n```\nThis doubles x.", "def f(x):\n    return 2 * x"),
    "tabs kept": ("\ndef f(x):\n\tif x:\n\t\treturn 1\n\treturn 0\nassert f(1) == 1", "def f(x):\n\tif x:\n\t\treturn 1\n\treturn 0"),
    "only prose": ("\nI am not sure how to solve this problem.", ""),
    "empty": ("", ""),
    "comments between functions": ("\n# helper\ndef h():\n    return 1\n\n# main\ndef m():\n    return h()\nm()\n",
                                   "# helper\ndef h():\n    return 1\n\n# main\ndef m():\n    return h()"),
    "constants and globals": ("\nR = 3\nC = 3\ndef min_cost(cost, m, n):\n    return R * C\nprint(min_cost(1, 2, 3))",
                              "R = 3\nC = 3\ndef min_cost(cost, m, n):\n    return R * C"),
    "new solution marker": ("\ndef f():\n    return 1\n# Solution:\ndef f():\n    return 2\nf(",
                            "def f():\n    return 1\n# Solution:\ndef f():\n    return 2"),
    "guarded import": ("\ntry:\n    import numpy as np\nexcept ImportError:\n    np = None\ndef f():\n    return np\nf()",
                       "try:\n    import numpy as np\nexcept ImportError:\n    np = None\ndef f():\n    return np"),
    "crlf": ("\r\ndef f(x):\r\n    return x\r\nassert f(1) == 1\r\n", "def f(x):\n    return x"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_realistic_completions(name):
    completion, expected = CASES[name]
    assert extract_program(completion) == expected


def test_extracted_program_runs():
    program = extract_program(CASES["function then asserts"][0])
    scope: dict = {}
    exec(compile(program, "<p>", "exec"), scope)
    assert scope["add"](2, 3) == 5
