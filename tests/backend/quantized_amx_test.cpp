// Tests of the AMX-BF16 prefill kernel (placeholder).
#include <gtest/gtest.h>
