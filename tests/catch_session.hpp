// The test executables' Catch2 session (catch_session.cpp: Catch2's implementation).
#pragma once

namespace flowloop::test {
// Catch::Session().run(argc, argv): the tests selected by the command line, the exit code.
int catch_session_run(int argc, char** argv);
}  // namespace flowloop::test
