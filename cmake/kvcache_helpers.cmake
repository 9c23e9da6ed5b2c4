# Helpers shared by the library, its tests and its benchmarks.

# Warnings for kvcache's own targets (never exported to consumers).
function(kvcache_target_warnings target)
  # g++ 12 flags every designated initializer that leaves a defaulted member out
  # (-Wmissing-field-initializers); g++ 13 stopped. Options structs are meant to be used that way.
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,13>>:-Wno-missing-field-initializers>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
endfunction()

# kvcache_add_test(<name> SOURCES <files...> [LIBS <targets...>] [TEST_PREFIX <prefix>]
#                  [WORKING_DIRECTORY <dir>])
# A GoogleTest program whose tests CTest lists one by one (discovered when the tests run, so a
# CUDA test program is never executed at build time). TEST_PREFIX keeps the names of a second
# program built from the same sources apart; WORKING_DIRECTORY is where its tests run (the build
# folder by default).
function(kvcache_add_test name)
  cmake_parse_arguments(ARG "" "TEST_PREFIX;WORKING_DIRECTORY" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE kvcache::kvcache GTest::gtest GTest::gtest_main ${ARG_LIBS})
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/tests)
  kvcache_target_warnings(${name})
  if(KVCACHE_NATIVE)
    target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-march=native>)
  endif()
  set(prefix_args)
  if(ARG_TEST_PREFIX)
    set(prefix_args TEST_PREFIX ${ARG_TEST_PREFIX})
  endif()
  if(ARG_WORKING_DIRECTORY)
    list(APPEND prefix_args WORKING_DIRECTORY ${ARG_WORKING_DIRECTORY})
  endif()
  gtest_discover_tests(${name} DISCOVERY_MODE PRE_TEST ${prefix_args}
                       PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=2")
endfunction()

# kvcache_add_benchmark(<name> SOURCES <files...> [LIBS <targets...>])
# A Google Benchmark program, always optimised (-O3 -DNDEBUG) whatever the build type.
function(kvcache_add_benchmark name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  # OpenMP for the benchmarks' own parallel loops (bench_util.hpp's streaming read, the yardstick
  # of every floor ratio, runs on the library's threads); the library links it privately.
  target_link_libraries(${name} PRIVATE kvcache::kvcache benchmark::benchmark OpenMP::OpenMP_CXX
                                        ${ARG_LIBS})
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/benchmarks)
  target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-O3 -DNDEBUG> $<$<COMPILE_LANGUAGE:CUDA>:-O3 -DNDEBUG>)
  if(KVCACHE_NATIVE)
    target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-march=native>)
  endif()
  kvcache_target_warnings(${name})
endfunction()
