// Value: construction, typed access, strict equality and Python's repr.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "ringpool/value.hpp"

using ringpool::Value;
using ringpool::ValueTypeError;

TEST_CASE("value: constructors pick the Python type") {
  CHECK(Value().is_none());
  CHECK(Value(nullptr).is_none());
  CHECK(Value(true).is_bool());
  CHECK(Value(7).is_int());
  CHECK(Value(std::int64_t{-7}).as_int() == -7);
  CHECK(Value(std::uint8_t{200}).as_int() == 200);
  CHECK(Value(2.5).is_float());
  CHECK(Value("text").is_str());  // not bool, although const char* converts to bool
  CHECK(Value(std::string("s")).as_str() == "s");
  CHECK(Value(std::string_view("v")).as_str() == "v");
  CHECK(Value::bytes("b").as_bytes() == "b");
  CHECK(Value::list({1, "a"}).as_list().size() == 2);
  CHECK(Value::tuple({}).is_tuple());
  CHECK(Value::dict({{"k", 1}}).as_dict().size() == 1);
  CHECK_THROWS_AS(Value(std::numeric_limits<std::uint64_t>::max()), std::out_of_range);
  CHECK(Value(std::uint64_t{1} << 62).as_int() == std::int64_t{1} << 62);
}

TEST_CASE("value: type names are Python's") {
  CHECK(Value().type_name() == "NoneType");
  CHECK(Value(false).type_name() == "bool");
  CHECK(Value(1).type_name() == "int");
  CHECK(Value(1.0).type_name() == "float");
  CHECK(Value("").type_name() == "str");
  CHECK(Value::bytes("").type_name() == "bytes");
  CHECK(Value::list().type_name() == "list");
  CHECK(Value::tuple().type_name() == "tuple");
  CHECK(Value::dict().type_name() == "dict");
}

TEST_CASE("value: a mismatched accessor names both types and never converts") {
  try {
    (void)Value("x").as_int();
    FAIL("no exception");
  } catch (const ValueTypeError& e) {
    CHECK(std::string(e.what()) == "ringpool::Value: expected int, got str");
  }
  CHECK_THROWS_AS((void)Value(true).as_int(), ValueTypeError);
  CHECK_THROWS_AS((void)Value(1).as_float(), ValueTypeError);
  CHECK_THROWS_AS((void)Value::list().as_tuple(), ValueTypeError);
  CHECK_THROWS_AS((void)Value::bytes("").as_str(), ValueTypeError);
  CHECK_THROWS_AS((void)Value().find("k"), ValueTypeError);
}

TEST_CASE("value: equality is strict and structural, copies are deep") {
  CHECK(Value(1) != Value(true));
  CHECK(Value(1) != Value(1.0));
  CHECK(Value::list({1}) != Value::tuple({1}));
  CHECK(Value("a") != Value::bytes("a"));
  CHECK(Value(std::nan("")) == Value(std::nan("")));
  CHECK(Value(0.0) != Value(-0.0));
  CHECK(Value::dict({{"a", 1}, {"b", 2}}) != Value::dict({{"b", 2}, {"a", 1}}));  // order counts

  Value original = Value::list({Value::dict({{"k", Value::list({1})}})});
  Value copy = original;
  CHECK(copy == original);
  copy.as_list()[0].as_dict()[0].second.as_list().push_back(2);
  CHECK(copy != original);
  CHECK(original.as_list()[0].at("k") == Value::list({1}));
  Value moved = std::move(copy);
  CHECK(moved.as_list()[0].at("k") == Value::list({1, 2}));
}

TEST_CASE("value: dict lookup") {
  const Value d = Value::dict({{"a", 1}, {2, "two"}, {Value::tuple({1, 2}), nullptr}});
  CHECK(d.at("a") == Value(1));
  CHECK(d.at(2).as_str() == "two");
  CHECK(d.find(Value::tuple({1, 2}))->is_none());
  CHECK(d.find("b") == nullptr);
  CHECK(d.find(2.0) == nullptr);  // strict: 2.0 is not the key 2
  CHECK_THROWS_WITH_AS(d.at("zz"), "ringpool::Value: key 'zz' not in dict", std::out_of_range);
}

TEST_CASE("value: repr matches Python's") {
  CHECK(Value().repr() == "None");
  CHECK(Value(true).repr() == "True");
  CHECK(Value(std::numeric_limits<std::int64_t>::min()).repr() == "-9223372036854775808");
  CHECK(Value(1.0).repr() == "1.0");
  CHECK(Value(-0.0).repr() == "-0.0");
  CHECK(Value(0.1).repr() == "0.1");
  CHECK(Value(1e16).repr() == "1e+16");
  CHECK(Value(1e15).repr() == "1000000000000000.0");
  CHECK(Value(1.5e-7).repr() == "1.5e-07");
  CHECK(Value(0.0001).repr() == "0.0001");
  CHECK(Value(123.456).repr() == "123.456");
  CHECK(Value(5e-324).repr() == "5e-324");
  CHECK(Value(std::numeric_limits<double>::infinity()).repr() == "inf");
  CHECK(Value(std::nan("")).repr() == "nan");
  CHECK(Value("it's").repr() == "\"it's\"");
  CHECK(Value("a'b\"c").repr() == "'a\\'b\"c'");
  CHECK(Value("\t\n\r\\\x01\x7f").repr() == "'\\t\\n\\r\\\\\\x01\\x7f'");
  CHECK(Value("h\xc3\xa9 \xe2\x9c\x93 \xc2\xa0").repr() == "'h\xc3\xa9 \xe2\x9c\x93 \\xa0'");
  CHECK(Value::bytes(std::string("\0\xff'a", 4)).repr() == "b\"\\x00\\xff'a\"");
  CHECK(Value::tuple({1}).repr() == "(1,)");
  CHECK(Value::tuple({1, 2}).repr() == "(1, 2)");
  CHECK(Value::tuple().repr() == "()");
  CHECK(Value::list({nullptr, Value::list()}).repr() == "[None, []]");
  CHECK(Value::dict({{"a", 1}, {Value::bytes("b"), Value::tuple({false})}}).repr() == "{'a': 1, b'b': (False,)}");
}
