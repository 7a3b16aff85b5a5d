import ast
import itertools

import pytest

from pva_sae.data.extract import extract_program
from pva_sae.data.mbpp import load_tasks

SIMILAR = ("def similar_elements(test_tup1, test_tup2):\n"
           "    res = tuple(set(test_tup1) & set(test_tup2))\n"
           "    return (res)")

# name -> (completion as generated after '# Solution:', expected program)
CASES = {
    "clean function": (
        "\n" + SIMILAR + "\n",
        SIMILAR),
    "function then the prompt's asserts": (
        "\n" + SIMILAR + "\n\nassert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
        "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n",
        SIMILAR),
    "function then prints": (
        "\ndef is_not_prime(n):\n    for i in range(2, int(n ** 0.5) + 1):\n        if n % i == 0:\n"
        "            return True\n    return False\n\nprint(is_not_prime(2))\nprint(is_not_prime(10))\n",
        "def is_not_prime(n):\n    for i in range(2, int(n ** 0.5) + 1):\n        if n % i == 0:\n"
        "            return True\n    return False"),
    "helper and main function, two blank lines between": (
        "\ndef is_power_of_two(x):\n    return x and (not (x & (x - 1)))\n\n\n"
        "def differ_At_One_Bit_Pos(a, b):\n    return is_power_of_two(a ^ b)\n\n\n"
        "assert differ_At_One_Bit_Pos(13, 9) == True\n",
        "def is_power_of_two(x):\n    return x and (not (x & (x - 1)))\n\n\n"
        "def differ_At_One_Bit_Pos(a, b):\n    return is_power_of_two(a ^ b)"),
    "imports kept, also between functions": (
        "\nimport heapq as hq\ndef heap_queue_largest(nums, n):\n    return hq.nlargest(n, nums)\n"
        "from collections import Counter\ndef most_common(xs):\n    return Counter(xs).most_common(1)\n",
        "import heapq as hq\ndef heap_queue_largest(nums, n):\n    return hq.nlargest(n, nums)\n"
        "from collections import Counter\ndef most_common(xs):\n    return Counter(xs).most_common(1)"),
    "class and function, then a __main__ block": (
        "\nclass Pair(object):\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n\n"
        "def max_chain_length(arr, n):\n    return n\n\n"
        "if __name__ == '__main__':\n    print(max_chain_length([Pair(5, 24)], 1))\n",
        "class Pair(object):\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n\n"
        "def max_chain_length(arr, n):\n    return n"),
    "main() and its call": (
        "\ndef square_nums(nums):\n    return list(map(lambda x: x ** 2, nums))\n\n"
        "def main():\n    print(square_nums([1, 2, 3]))\n\nmain()\n",
        "def square_nums(nums):\n    return list(map(lambda x: x ** 2, nums))\n\n"
        "def main():\n    print(square_nums([1, 2, 3]))"),
    "cut by the token limit inside the second function": (
        "\ndef find_Rotations(s):\n    return len(s)\n\ndef helper(s):\n    for i in range(len(s)):\n"
        "        if s[i:] + s[:i] ==",
        "def find_Rotations(s):\n    return len(s)"),
    "cut by the token limit inside the only function": (
        "\ndef remove_Occ(s, ch):\n    for i in range(len(s)):\n        if s[i] == ch:\n            s = s[0:i] +",
        ""),
    "cut by the token limit in a top-level call": (
        "\ndef sort_matrix(M):\n    return sorted(M, key=sum)\n\nresult = sort_matrix([[1, 2, 3], [2,",
        "def sort_matrix(M):\n    return sorted(M, key=sum)"),
    "a new problem in prose after the code": (
        "\ndef count_common(words):\n    return words\n\nWrite a function to find the volume of a "
        "triangular prism.\nassert find_Volume(10,8,6) == 240\n\ndef find_Volume(l, b, h):\n    return l * b * h / 2\n",
        "def count_common(words):\n    return words"),
    "markdown fence with prose around it": (
        " Here is the code:\n```python\ndef split_lowerstring(text):\n    import re\n"
        "    return re.findall('[a-z][^a-z]*', text)\n```\nThis uses a regular expression.\n",
        "def split_lowerstring(text):\n    import re\n    return re.findall('[a-z][^a-z]*', text)"),
    "a closing fence after the code": (
        "\ndef text_lowercase_underscore(text):\n    return '_' in text\n```\n\n## Explanation\n",
        "def text_lowercase_underscore(text):\n    return '_' in text"),
    "tabs and CRLF as in the MBPP references": (
        "\r\ndef square_perimeter(a):\r\n\tif a < 0:\r\n\t\treturn 0\r\n\tperimeter=4*a\r\n\treturn perimeter\r\n"
        "assert square_perimeter(10)==40\r\n",
        "def square_perimeter(a):\n\tif a < 0:\n\t\treturn 0\n\tperimeter=4*a\n\treturn perimeter"),
    "only prose": (
        "\nI am not sure how to solve this problem. Could you give me a hint?\n",
        ""),
    "empty": ("", ""),
    "whitespace only": ("\n   \n\t\n", ""),
    "comment lines between functions; a trailing comment dropped": (
        "\n# convert to a set first\ndef to_set(xs):\n    return set(xs)\n\n# the solution\n"
        "def test_duplicate(arraynums):\n    return len(to_set(arraynums)) != len(arraynums)\n\n# Test cases\n",
        "# convert to a set first\ndef to_set(xs):\n    return set(xs)\n\n# the solution\n"
        "def test_duplicate(arraynums):\n    return len(to_set(arraynums)) != len(arraynums)"),
    "constants before the function": (
        "\nR = 3\nC = 3\ndef min_cost(cost, m, n):\n    return R * C\nprint(min_cost([[1]], 2, 2))",
        "R = 3\nC = 3\ndef min_cost(cost, m, n):\n    return R * C"),
    "a trailing call of the solution assigned to a name": (
        "\ndef dif_Square(n):\n    return n % 4 != 2\n\nresult = dif_Square(5)\n",
        "def dif_Square(n):\n    return n % 4 != 2"),
    "a precomputed table between definitions is kept": (
        "\ndef sieve(n):\n    return [i for i in range(2, n) if all(i % d for d in range(2, i))]\n"
        "PRIMES = sieve(100)\ndef nth_prime(k):\n    return PRIMES[k]\nnth_prime(3)\n",
        "def sieve(n):\n    return [i for i in range(2, n) if all(i % d for d in range(2, i))]\n"
        "PRIMES = sieve(100)\ndef nth_prime(k):\n    return PRIMES[k]"),
    "reading input ends the program": (
        "\nLIMIT = 10\nn = int(input())\ndef f(x):\n    return x\n",
        "LIMIT = 10"),
    "a loop over test cases": (
        "\ndef is_woodall(x):\n    return x == 383\n\nfor x in [383, 254]:\n    print(is_woodall(x))\n",
        "def is_woodall(x):\n    return x == 383"),
    "the initiator again starts a new solution": (
        "\ndef rev(num):\n    return int(str(num)[::-1])\n\n# Solution:\ndef rev(num):\n    return 0\n",
        "def rev(num):\n    return int(str(num)[::-1])"),
    "the initiator echoed before any code": (
        "\n# Solution:\ndef rev(num):\n    return int(str(num)[::-1])\n",
        "# Solution:\ndef rev(num):\n    return int(str(num)[::-1])"),
    "the rest of the '# Solution:' comment line is not code": (
        " use sets\ndef common(a, b):\n    return set(a) & set(b)\n",
        "def common(a, b):\n    return set(a) & set(b)"),
    "code written on the comment line itself": (
        " def common(a, b):\n    return set(a) & set(b)\n",
        "def common(a, b):\n    return set(a) & set(b)"),
    "a guarded import and a decorator": (
        "\ntry:\n    from functools import lru_cache\nexcept ImportError:\n    lru_cache = None\n\n"
        "@lru_cache(maxsize=None)\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nfib(10)",
        "try:\n    from functools import lru_cache\nexcept ImportError:\n    lru_cache = None\n\n"
        "@lru_cache(maxsize=None)\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"),
    "a module call that sets things up": (
        "\nimport sys\nsys.setrecursionlimit(10000)\ndef depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
        "sys.stdout.write(str(depth(5)))\n",
        "import sys\nsys.setrecursionlimit(10000)\ndef depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)"),
    "prose that happens to parse": (
        "\ndef find_max(xs):\n    return max(xs)\nNote: this is O(n)\nExample: find_max([1, 2])\n",
        "def find_max(xs):\n    return max(xs)"),
    "prose before the code": (
        "\nThe idea is to count the bits.\ndef count_bits(n):\n    return bin(n).count('1')\n",
        "def count_bits(n):\n    return bin(n).count('1')"),
    "code indented as a whole": (
        "\n    def add(a, b):\n        return a + b\n",
        "def add(a, b):\n    return a + b"),
    "a stray string after the code": (
        "\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n    return a + b\n\n\"\"\"\nExample: add(1, 2) gives 3\n\"\"\"\n",
        "def add(a, b):\n    \"\"\"Add.\"\"\"\n    return a + b"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_realistic_completions(name):
    completion, expected = CASES[name]
    assert extract_program(completion) == expected


def _is_test_code(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Assert, ast.For, ast.While)):
        return True
    if isinstance(node, ast.If):
        return "__name__" in ast.unparse(node.test)
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)


@pytest.mark.parametrize("name", [name for name, (_, expected) in CASES.items() if expected])
def test_programs_parse_and_hold_no_top_level_test_code(name):
    tree = ast.parse(extract_program(CASES[name][0]))
    assert not [ast.unparse(node) for node in tree.body if _is_test_code(node)]


def test_extracted_program_passes_its_tests():
    program = extract_program(CASES["function then the prompt's asserts"][0])
    scope: dict = {}
    exec(compile(program, "<program>", "exec"), scope)
    assert scope["similar_elements"]((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)


def test_prompt_end_decides_whether_the_first_line_is_a_comment():
    completion = "x = 1\ndef f():\n    return x\n"
    assert extract_program(completion, prompt_end="...\n\n# Solution:") == "def f():\n    return x"
    assert extract_program(completion, prompt_end="...\n\n") == "x = 1\ndef f():\n    return x"


def test_garbage_does_not_raise():
    for completion in ("\x00def f(): pass", "(" * 500, "\ndef f(:\n", "```", "```python\n```"):
        assert extract_program(completion) == ""


def _blank(line: str) -> bool:
    return not line.strip()


def test_every_reference_solution_survives_extraction():
    # A completion that is an MBPP reference solution followed by its tests extracts to the solution.
    for task in load_tasks():
        completion = "\n" + task.code + "\n\n" + "\n".join(task.test_list) + "\n"
        expected = "\n".join(itertools.dropwhile(_blank, task.code.split("\n"))).rstrip()
        assert extract_program(completion) == expected, task.task_id
