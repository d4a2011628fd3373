// The doctest runner. With --test-zygote it is instead the zygote that test_zygote.cpp drives
// (a C++ zygote speaking the same protocol as the Python one).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstring>

int test_zygote_main();

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--test-zygote") == 0) return test_zygote_main();
  doctest::Context context(argc, argv);
  return context.run();
}
