// The functions the example service lets a client call, decided by the operator at start-up; a
// request naming anything else is refused in the service, before anything is imported or run.
//
// Two sources, both exact "module:qualname" strings (no prefixes, no patterns):
//   --allow MODULE:FUNCTION    one function, any importable module (repeatable);
//   --package NAME=FOLDER      the functions listed in FOLDER/EXPORTS, one per line:
//                                word_count           -> NAME:word_count (in NAME/__init__.py)
//                                counting:count       -> NAME.counting:count
//                              '#' starts a comment. A folder without EXPORTS exports nothing:
//                              shipping a package does not make its functions callable.
// A manifest, not Python's __all__: the service never runs Python, so it reads a plain list
// rather than guessing at what a module would compute at import time.
#pragma once

#include <fstream>
#include <stdexcept>
#include <string>
#include <unordered_set>

namespace exports {

class BadExport : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A dotted Python name: identifiers ([A-Za-z_][A-Za-z0-9_]*) joined by single dots.
inline bool dotted_name(const std::string& s) {
  bool start = true;
  for (char c : s) {
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    const bool digit = c >= '0' && c <= '9';
    if (c == '.') {
      if (start) return false;
      start = true;
    } else if (alpha || (digit && !start)) {
      start = false;
    } else {
      return false;
    }
  }
  return !start;
}

class Allowlist {
 public:
  // "module:qualname"; throws BadExport for anything else.
  void allow(const std::string& spec) {
    const auto colon = spec.find(':');
    if (colon == std::string::npos || !dotted_name(spec.substr(0, colon)) || !dotted_name(spec.substr(colon + 1)))
      throw BadExport("not a \"module:function\" name: " + spec);
    allowed_.insert(spec);
  }

  // Reads FOLDER/EXPORTS of the package shipped as `name`; returns how many it exports (0 when
  // the file does not exist). Throws BadExport for a malformed line.
  std::size_t allow_package(const std::string& name, const std::string& folder) {
    if (!dotted_name(name)) throw BadExport("not a package name: " + name);
    const std::string path = folder + "/EXPORTS";
    std::ifstream in(path);
    if (!in) return 0;
    std::size_t n = 0, lineno = 0;
    for (std::string line; std::getline(in, line);) {
      ++lineno;
      line = line.substr(0, line.find('#'));
      const auto b = line.find_first_not_of(" \t\r");
      if (b == std::string::npos) continue;
      line = line.substr(b, line.find_last_not_of(" \t\r") - b + 1);
      const auto colon = line.find(':');
      const std::string spec = colon == std::string::npos ? name + ":" + line : name + "." + line;
      try {
        allow(spec);
      } catch (const BadExport&) {
        throw BadExport(path + ":" + std::to_string(lineno) + ": not a function name: " + line);
      }
      ++n;
    }
    return n;
  }

  bool allowed(const std::string& function) const { return allowed_.count(function) != 0; }
  std::size_t size() const { return allowed_.size(); }

 private:
  std::unordered_set<std::string> allowed_;
};

}  // namespace exports
